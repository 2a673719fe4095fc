"""The uninterrupted reference of a training run: every node's worker loop in this process
(one thread per node), outer steps exchanged in memory. No Ray, no HTTP, no kill: the
parameters a run over Ray Train and real MLNodes must reproduce bit for bit."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from cluster.train.config import ScalingSpec, TrainRunConfig, WorkerSpec, node_order
from cluster.train.data import snapshot_dataset
from cluster.train.exchange import SyncResult
from cluster.train.loop import LocalWorkerEnv, WorkerOutcome, run_worker


class MemoryNetwork:
    """Every node's message of a step, handed to every node once all are in."""

    def __init__(self, nodes: int) -> None:
        self._nodes = nodes
        self._messages: dict[int, dict[str, bytes]] = {}
        self._cond = threading.Condition()

    def exchange(self, sender: str, step: int, payload: bytes) -> SyncResult:
        with self._cond:
            self._messages.setdefault(step, {})[sender] = payload
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: len(self._messages[step]) == self._nodes,
                                       timeout=300):
                raise TimeoutError(f"step {step}: not every node sent its message")
            return SyncResult(outer_step=step, payloads=dict(self._messages[step]))


class MemoryNetworkEnv(LocalWorkerEnv):
    def __init__(self, public_key: str, checkpoint_root: Path, network: MemoryNetwork) -> None:
        super().__init__(public_key, checkpoint_root)
        self.network = network

    def exchange(self, outer_step: int, payload: bytes) -> SyncResult:
        return self.network.exchange(self.public_key, outer_step, payload)


def reference_run(runs: dict[str, dict[str, Any]], keys: dict[str, str],
                  out: Path) -> dict[str, WorkerOutcome]:
    """Run every node of a training run (``runs``: name -> start body, ``keys``: name -> public
    key) to its end in this process, under ``out``."""
    network = MemoryNetwork(len(runs))
    outcomes: dict[str, WorkerOutcome] = {}
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            run = TrainRunConfig.model_validate({**runs[name], "output_dir": str(out / name)})
            data = asyncio.run(snapshot_dataset(run.dataset, run.data_file))
            order = node_order(keys[name], run.peers)
            spec = WorkerSpec(run=run, scaling=ScalingSpec(threads_per_worker=1),
                              node_public_key=keys[name], node_index=order.index(keys[name]),
                              node_count=len(order), data_file=data.path)
            env = MemoryNetworkEnv(keys[name], run.output_path / "ckpt", network)
            outcomes[name] = run_worker(spec, env)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(name,)) for name in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outcomes
