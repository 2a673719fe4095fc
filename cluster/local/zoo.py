"""The cheater zoo as a child process: start it, learn its nodes' URLs, stop it.

The zoo's servers (``python -m cluster.testing.zoo``) are test doubles; product code never
imports them. ``make run``'s demo starts them here as separate processes, by module name,
and measures them as it would any remote node.

The zoo as ``make run`` uses it: every cheater next to the real honest node, registered
as ordinary nodes claiming the honest node's model.

    with demo_zoo(model_dir, honest_url=vllm_node_url) as zoo:
        for node in zoo_nodes(zoo.urls, model="smollm2"):
            await stores.nodes.add(node)          # after the honest node: it holds the identity
        verdicts = await run_verification(settings.honesty, nodes, references,
                                          guard=EndpointGuard.of(settings.requester.endpoint_allowlist))
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from cluster.core.errors import TestbenchError
from cluster.core.schemas import Node
from cluster.local.processes import stop_process

READY_PREFIX = "zoo_listening "
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


class ZooStartError(TestbenchError):
    """The zoo process exited or stayed silent before serving."""


class ZooProcess:
    """``with ZooProcess(["honest", "proxy@honest"], model_dir) as zoo: zoo.urls[...]``."""

    def __init__(
        self,
        nodes: Sequence[str],
        model_dir: str | Path,
        *,
        log_path: str | Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        self.nodes = list(nodes)
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path) if log_path is not None else None
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **OFFLINE_ENV, **(env or {})}
        self.start_timeout_s = start_timeout_s
        self.urls: dict[str, str] = {}
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> dict[str, str]:
        cmd = [sys.executable, "-m", "cluster.testing.zoo", "--model-dir", str(self.model_dir),
               *[a for n in self.nodes for a in ("--node", n)], *self.extra_args]
        stderr = open(self.log_path, "w") if self.log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                      env=self.env, cwd=Path(__file__).resolve().parents[2])
        if stderr is not subprocess.DEVNULL:
            stderr.close()
        line: list[str] = []
        reader = threading.Thread(
            target=lambda: line.append(self._proc.stdout.readline() if self._proc and
                                       self._proc.stdout else ""), daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        text = line[0] if line else ""
        if not text.startswith(READY_PREFIX):
            code = self._proc.poll()
            self.stop()
            raise ZooStartError(f"zoo did not start within {self.start_timeout_s:.0f} s "
                                f"(exit code {code}); see {self.log_path or 'its stderr'}")
        self.urls = json.loads(text[len(READY_PREFIX):])
        return dict(self.urls)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout_s=30, kill_timeout_s=30, name="zoo")

    def __enter__(self) -> ZooProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


CHEATERS: tuple[str, ...] = ("perturbed", "quantized", "lazy", "random")
NODE_PREFIX = "zoo-"


def demo_zoo(model_dir: str | Path, *, honest_url: str | None = None,
             log_path: str | Path | None = None) -> ZooProcess:
    """A zoo of every cheater; the proxy fronts ``honest_url`` (e.g. the real vLLM node),
    or, without one, a zoo ``honest`` node started alongside."""
    nodes = [*CHEATERS, f"proxy@{honest_url}" if honest_url else "proxy@honest"]
    if honest_url is None:
        nodes.insert(0, "honest")
    return ZooProcess(nodes, model_dir, log_path=log_path)


def zoo_nodes(urls: Mapping[str, str], model: str = "smollm2",
              tasks: list[str] | None = None) -> list[Node]:
    """Registry records of the zoo's nodes (ids ``zoo-<kind>``), honest one first.
    ``tasks``: what the measuring loop runs on them (None = every configured task)."""
    order = sorted(urls, key=lambda name: (name != "honest", name))
    return [Node(node_id=f"{NODE_PREFIX}{name}", url=urls[name], model=model,
                 api="completions", tasks=tasks) for name in order]
