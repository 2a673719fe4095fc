"""Embedded database servers for when no external URL is configured (see docs/architecture.md, "Storage").

- ``EmbeddedPostgres``: a real PostgreSQL 16 from the ``pgserver`` wheel's binaries, run
  directly (not through ``pg_ctl``) as our child process, listening on TCP 127.0.0.1 only.
- ``EmbeddedMongo``: the MongoDB wire-protocol server ``nx-27017`` (SQLite-backed), run as
  ``python -m nx_27017.nx_27017`` on 127.0.0.1.
- ``EmbeddedStores``: starts what ``StoreSettings`` leaves unset and returns settings whose
  URLs point at the running servers.

Ownership rules, so that no server outlives the process that started it:
- each data dir is guarded by an ``flock`` held for the server's lifetime; a second
  process using the same data dir gets a clear error instead of a second server;
- a server found running on a data dir whose lock we just took is an orphan of a dead
  owner: it is stopped before a fresh one starts;
- servers stop on ``stop()``, on interpreter exit (``atexit``) and, when started from the
  main thread on Linux, when the owning process dies (``PR_SET_PDEATHSIG``).

Data lives in ``data_dir/postgres`` and ``data_dir/mongo``; a restart on the same data dir
finds the data again (ports are chosen afresh unless given).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from actors.cpu_policy import enter_cpu_policy
from cluster.core.errors import ErrorCode, TestbenchError
from cluster.core.settings import StoreSettings
from cluster.local.processes import stop_process

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PG_SYSTEM_USER = "pgserver"  # the same unprivileged user pgserver itself creates under root
PG_USER = "postgres"
PG_DATABASE = "postgres"
_PR_SET_PDEATHSIG = 1


class EmbeddedServerError(TestbenchError):
    """An embedded server could not be started (the message carries its log tail)."""

    code = ErrorCode.DATABASE_READ


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the server may still lose the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(empty log at {path})"


def _port_is_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", errors="replace")


def _signal_and_wait(pid: int, sig: int, timeout_s: float) -> None:
    """Send ``sig`` to a process that is not our child; SIGKILL it after ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _parent_death_preexec(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when we die.

    Linux delivers it when the *thread* that forked exits, so it is only used when
    starting from the main thread (whose exit is the process's exit).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def _child_preexec(sig: int, cpu_policy: str) -> Callable[[], None] | None:
    """The child's ``preexec_fn``: the parent-death signal and the CPU policy."""
    on_parent_death = _parent_death_preexec(sig)
    if cpu_policy == "normal":
        return on_parent_death

    def preexec() -> None:
        if on_parent_death is not None:
            on_parent_death()
        enter_cpu_policy(cpu_policy)

    return preexec


class _DataDirLock:
    """An exclusive ``flock`` on a file: held while a server runs on that data dir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def acquire(self, what: str) -> None:
        if self._fh is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise EmbeddedServerError(
                f"{what}: data dir {self.path.parent} is in use by another process (pid {holder}, "
                f"lock {self.path}); "
                "stop it or use another stores.data_dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None


class _ChildServer:
    """What both embedded servers share: one child process, a lock, a log, a URL."""

    kind = "server"

    def __init__(self, root: Path, port: int | None, start_timeout_s: float) -> None:
        self.root = root.expanduser().resolve()
        # Linux scheduling policy of the server (actors/cpu_policy.py); its processes
        # inherit it. The loop's stores follow the loop's ``ray.loop_cpu_policy``.
        self.cpu_policy = "normal"
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._requested_port = port
        # After a first start on a free port, restarts reuse it: clients keep their URL.
        self._last_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._log_fh: IO[bytes] | None = None
        self._lock = _DataDirLock(self.root.parent / f".{self.kind}.lock")
        self._mutex = threading.RLock()
        self._atexit_registered = False

    # -- to implement --------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create/initialise the data dir and stop orphans (the lock is held)."""

    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _run_as_user(self) -> str | None:
        return None

    def _make_url(self, port: int) -> str:
        raise NotImplementedError

    def _is_ready(self, port: int) -> bool:
        raise NotImplementedError

    def _stop_signal(self) -> int:
        return signal.SIGTERM

    def _port_conflict(self, tail: str) -> bool:
        return "address already in use" in tail.lower()

    # -- lifecycle -----------------------------------------------------------------
    @property
    def url(self) -> str | None:
        return self._url if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self) -> str:
        """Start the server (no-op when it already runs) and return its URL."""
        with self._mutex:
            if self.running and self._url is not None:
                return self._url
            if self._proc is not None:  # it died since: clean up before restarting
                self._cleanup_process()
            self._lock.acquire(f"embedded {self.kind}")
            try:
                self._prepare()
                url = self._launch()
            except BaseException:
                self._lock.release()
                raise
            if not self._atexit_registered:
                atexit.register(self.stop)
                self._atexit_registered = True
            return url

    def _launch(self) -> str:
        fixed = self._requested_port if self._requested_port is not None else self._last_port
        # A free port can be taken by another process before the server binds it: retry.
        attempts = 1 if fixed is not None else 3
        last_error: EmbeddedServerError | None = None
        for attempt in range(1, attempts + 1):
            port = fixed if fixed is not None else free_port()
            started = time.monotonic()
            self._spawn(port)
            try:
                self._wait_ready(port)
            except EmbeddedServerError as err:
                tail = log_tail(self.log_path)
                self._cleanup_process()
                last_error = err
                if attempt < attempts and self._port_conflict(tail):
                    log.warning("embedded.%s.port_taken port=%d attempt=%d", self.kind, port, attempt)
                    continue
                raise
            self.port = self._last_port = port
            self._url = self._make_url(port)
            log.info(
                "embedded.%s.started pid=%s port=%d data_dir=%s seconds=%.2f",
                self.kind, self.pid, port, self.root, time.monotonic() - started,
            )
            return self._url
        assert last_error is not None
        raise last_error

    def _spawn(self, port: int) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = self.log_path.open("ab")
        self._log_fh.write(f"\n--- testbench: starting {self.kind} on port {port} ---\n".encode())
        self._log_fh.flush()
        cmd = self._command(port)
        log.debug("embedded.%s.spawn cmd=%s", self.kind, cmd)
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_preexec(self._stop_signal(), self.cpu_policy),
                user=self._run_as_user(),
            )
        except OSError as err:
            self._close_log()
            raise EmbeddedServerError(f"embedded {self.kind}: cannot run {cmd[0]}: {err}") from err

    def _wait_ready(self, port: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EmbeddedServerError(
                    f"embedded {self.kind} exited with code {code} while starting on "
                    f"{HOST}:{port} (data dir {self.root}). Log tail ({self.log_path}):\n"
                    f"{log_tail(self.log_path)}"
                )
            if self._is_ready(port):
                return
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"embedded {self.kind} did not become ready on {HOST}:{port} within "
                    f"{self.start_timeout_s:.0f}s (data dir {self.root}). Log tail "
                    f"({self.log_path}):\n{log_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server and wait for it; a no-op when it is not running."""
        with self._mutex:
            was_running = self.running
            pid = self.pid
            self._cleanup_process()
            self._lock.release()
            if was_running:
                log.info("embedded.%s.stopped pid=%s data_dir=%s", self.kind, pid, self.root)

    def _cleanup_process(self) -> None:
        proc = self._proc
        if proc is not None:
            stop_process(proc, stop_signal=self._stop_signal(), name=f"embedded.{self.kind}")
        self._proc = None
        self._url = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> _ChildServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pgserver_bin_dir() -> Path:
    """The PostgreSQL binaries inside the ``pgserver`` wheel (without importing pgserver,
    whose import creates runtime dirs and locks we do not use)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("embedded postgres needs the pgserver wheel: pip install pgserver")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EmbeddedServerError(f"pgserver is installed but has no binaries in {bin_dir}")
    return bin_dir


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    try:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise EmbeddedServerError(
            f"embedded postgres: PostgreSQL refuses to run as root and creating the system user "
            f"{name!r} failed: {detail.strip()}"
        ) from err
    return pwd.getpwnam(name)


def _make_traversable(path: Path) -> None:
    """Let another user reach ``path`` (o+x on every ancestor), as pgserver does."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


class EmbeddedPostgres(_ChildServer):
    """PostgreSQL 16 from the pgserver wheel, on TCP 127.0.0.1, data in ``data_dir/postgres``.

    Under root, PostgreSQL runs as the unprivileged system user ``pgserver`` (created if
    missing), which then owns ``data_dir/postgres``.
    """

    kind = "postgres"

    def __init__(self, data_dir: Path, port: int | None = None, start_timeout_s: float = 60.0) -> None:
        super().__init__(Path(data_dir) / "postgres", port, start_timeout_s)
        self._run_as: str | None = None

    @property
    def pgdata(self) -> Path:
        return self.root

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def _prepare(self) -> None:
        bin_dir = _pgserver_bin_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = _ensure_system_user(PG_SYSTEM_USER)
            self._run_as = PG_SYSTEM_USER
            _make_traversable(self.root.parent)
            # the binaries too: a checkout in a 0700 directory (``mktemp -d``) would hide
            # initdb and postgres inside its .venv from that user
            _make_traversable(bin_dir.parent)
            for path in [self.root, *self.root.rglob("*")]:
                if path.lstat().st_uid != user.pw_uid:
                    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        self.root.chmod(0o700)
        if not (self.root / "PG_VERSION").exists():
            self._initdb(bin_dir)
        self._stop_orphan()

    def _initdb(self, bin_dir: Path) -> None:
        if any(self.root.iterdir()):
            raise EmbeddedServerError(
                f"embedded postgres: {self.root} is not empty but holds no PostgreSQL cluster "
                "(no PG_VERSION); move it away or use another stores.data_dir"
            )
        started = time.monotonic()
        cmd = [
            str(bin_dir / "initdb"), "-D", str(self.root), "-U", PG_USER, "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-instructions",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, user=self._run_as, timeout=300)
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"embedded postgres: initdb failed with code {result.returncode} for {self.root}:\n"
                f"{(result.stdout + result.stderr)[-4000:]}"
            )
        log.info("embedded.postgres.initdb data_dir=%s seconds=%.2f", self.root, time.monotonic() - started)

    def _stop_orphan(self) -> None:
        pid_file = self.root / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        if pid != os.getpid() and _pid_alive(pid) and "postgres" in _cmdline(pid):
            log.warning("embedded.postgres.orphan_stopped pid=%d data_dir=%s", pid, self.root)
            _signal_and_wait(pid, signal.SIGINT, timeout_s=30)

    def _command(self, port: int) -> list[str]:
        return [
            str(_pgserver_bin_dir() / "postgres"), "-D", str(self.root),
            "-h", HOST, "-p", str(port), "-k", "",  # TCP only: no unix socket
            "-c", "max_connections=200",
        ]

    def _run_as_user(self) -> str | None:
        return self._run_as

    def _stop_signal(self) -> int:
        return signal.SIGINT  # "fast" shutdown: roll back open transactions, checkpoint, exit

    def _is_ready(self, port: int) -> bool:
        try:
            lines = (self.root / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready" and _port_is_open(port)

    def _port_conflict(self, tail: str) -> bool:
        low = tail.lower()
        return "could not bind" in low or "address already in use" in low

    def _make_url(self, port: int) -> str:
        return f"postgresql://{PG_USER}@{HOST}:{port}/{PG_DATABASE}"


class EmbeddedMongo(_ChildServer):
    """nx-27017 (MongoDB wire protocol on SQLite) on 127.0.0.1, data in ``data_dir/mongo``."""

    kind = "mongo"

    def __init__(self, data_dir: Path, port: int | None = None, start_timeout_s: float = 30.0) -> None:
        super().__init__(Path(data_dir) / "mongo", port, start_timeout_s)

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "nx-27017.pid"

    def _prepare(self) -> None:
        if importlib.util.find_spec("nx_27017") is None:
            raise EmbeddedServerError("embedded mongo needs nx-27017: pip install nx-27017")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if pid != os.getpid() and _pid_alive(pid) and "nx_27017" in _cmdline(pid):
            log.warning("embedded.mongo.orphan_stopped pid=%d data_dir=%s", pid, self.root)
            _signal_and_wait(pid, signal.SIGTERM, timeout_s=15)
        self.pid_file.unlink(missing_ok=True)

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable, "-c", "import sys; from nx_27017.nx_27017 import main; sys.exit(main())",
            "--data-dir", str(self.root), "--host", HOST, "--port", str(port),
            "--pid-file", str(self.pid_file),
            # its stderr already goes to server.log; a second file handler would double it
            "--log-file", os.devnull,
        ]

    def _is_ready(self, port: int) -> bool:
        if not _port_is_open(port):
            return False
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        client: MongoClient[dict[str, object]] = MongoClient(
            self._make_url(port), serverSelectionTimeoutMS=1000, connectTimeoutMS=1000
        )
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()

    def _make_url(self, port: int) -> str:
        return f"mongodb://{HOST}:{port}"


class EmbeddedStores:
    """Start the embedded servers that ``settings`` does not replace with a URL.

    ``start()`` returns a copy of the settings with both URLs set; with
    ``postgres_url``/``mongo_url`` already set nothing is started for that store.
    """

    def __init__(self, settings: StoreSettings, cpu_policy: str = "normal") -> None:
        self.settings = settings
        self.postgres: EmbeddedPostgres | None = None
        self.mongo: EmbeddedMongo | None = None
        if settings.postgres_url is None:
            self.postgres = EmbeddedPostgres(settings.data_dir)
        if settings.mongo_url is None:
            self.mongo = EmbeddedMongo(settings.data_dir)
        for server in (self.postgres, self.mongo):
            if server is not None:
                server.cpu_policy = cpu_policy

    @property
    def started(self) -> list[str]:
        """Kinds of the servers this object runs (empty when both URLs are external)."""
        return [s.kind for s in (self.postgres, self.mongo) if s is not None and s.running]

    def start(self) -> StoreSettings:
        postgres_url = self.settings.postgres_url
        mongo_url = self.settings.mongo_url
        try:
            if self.postgres is not None:
                postgres_url = self.postgres.start()
            if self.mongo is not None:
                mongo_url = self.mongo.start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "embedded.stores.ready postgres=%s mongo=%s started=%s",
            "embedded" if self.postgres else "external",
            "embedded" if self.mongo else "external",
            ",".join(self.started) or "none",
        )
        return self.settings.model_copy(update={"postgres_url": postgres_url, "mongo_url": mongo_url})

    def stop(self) -> None:
        for server in (self.mongo, self.postgres):
            if server is not None:
                server.stop()

    def __enter__(self) -> StoreSettings:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
