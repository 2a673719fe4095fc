"""Helpers for tests that need database servers (no pytest dependency).

``ExternalPostgres`` / ``ExternalMongo`` start servers the way an operator would, *outside*
``cluster.local.embedded``: pgserver through its own Python API (which serves on a unix socket,
so the URL is the ``?host=/socket/dir`` form) in a separate helper process, and the
``nx-27017`` console script. Tests hand their URLs to ``StoreSettings.postgres_url`` /
``mongo_url`` to prove that the external-URL path works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cluster.local.embedded import HOST, EmbeddedServerError, free_port, log_tail
from cluster.local.processes import stop_process

_PGSERVER_HELPER = """
import sys
import pgserver
server = pgserver.get_server(sys.argv[1], cleanup_mode="stop")
print(server.get_uri(), flush=True)
sys.stdin.read()  # serve until our stdin closes; pgserver's atexit hook stops the server
"""


class ExternalPostgres:
    """PostgreSQL started by ``pgserver.get_server`` in a helper process."""

    def __init__(self, data_dir: Path, start_timeout_s: float = 120.0) -> None:
        self.data_dir = Path(data_dir)
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self.url: str | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "helper.log"

    def start(self) -> str:
        if self._proc is not None and self.url is not None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_fh:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _PGSERVER_HELPER, str(self.data_dir / "pgdata")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_fh,
                text=True,
            )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()  # blocks until the helper prints or dies
        if not line.startswith("postgresql://"):
            self.stop()
            raise EmbeddedServerError(f"pgserver helper did not start:\n{log_tail(self.log_path)}")
        self.url = line
        return line

    def stop(self) -> None:
        proc, self._proc, self.url = self._proc, None, None
        if proc is not None:
            stop_process(proc, stop_signal=None, timeout_s=60, name="pgserver-helper")


class ExternalMongo:
    """nx-27017 started through its console script, in its own data dir and port."""

    def __init__(self, data_dir: Path, start_timeout_s: float = 30.0) -> None:
        self.data_dir = Path(data_dir)
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nx-27017.log"

    def start(self) -> str:
        if self._proc is not None and self.url is not None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        script = shutil.which("nx-27017", path=os.path.dirname(sys.executable)) or shutil.which("nx-27017")
        if script is None:
            raise EmbeddedServerError("the nx-27017 console script is not installed")
        port = free_port()
        with self.log_path.open("ab") as log_fh:
            self._proc = subprocess.Popen(
                [
                    script, "--data-dir", str(self.data_dir / "db"), "--host", HOST, "--port", str(port),
                    "--pid-file", str(self.data_dir / "nx-27017.pid"), "--log-file", os.devnull,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
            )
        url = f"mongodb://{HOST}:{port}"
        deadline = time.monotonic() + self.start_timeout_s
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        while True:
            if self._proc.poll() is not None:
                self.stop()
                raise EmbeddedServerError(f"nx-27017 exited while starting:\n{log_tail(self.log_path)}")
            client: MongoClient[dict[str, object]] = MongoClient(url, serverSelectionTimeoutMS=500)
            try:
                client.admin.command("ping")
                break
            except PyMongoError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedServerError(f"nx-27017 did not answer:\n{log_tail(self.log_path)}") from None
                time.sleep(0.1)
            finally:
                client.close()
        self.url = url
        return url

    def stop(self) -> None:
        proc, self._proc, self.url = self._proc, None, None
        if proc is not None:
            stop_process(proc, timeout_s=15, name="nx-27017")
