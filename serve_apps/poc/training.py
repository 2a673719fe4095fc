"""Training runs on Ray Train: the one place the node's training is wired to Ray.

- the run's coordinator (``cluster/train/coordinator.py``) runs as a Ray actor owned by the
  node's ingress: the workers report to it and exchange through it, the ingress asks it for
  status and hands it the peers' messages;
- a ``TorchTrainer`` (gloo on CPU, NCCL on GPUs) runs ``scaling.workers`` workers, each
  :func:`train_loop_per_worker` -> ``cluster/train/loop.py::run_worker``;
- checkpoints go through ``ray.train.report`` into ``{output_dir}/checkpoints/{run_id}``; a restarted
  worker group (``FailureConfig.max_failures``) and a run started again with the same run id
  and output directory (a restarted node) continue from the newest one
  (``ray.train.get_checkpoint``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray

from cluster.auth.keys import Ed25519Key
from cluster.core.settings import EndpointAllowlist
from cluster.nodes.policy import EndpointGuard
from cluster.train.config import ScalingSpec, TrainRunConfig, WorkerSpec, node_order
from cluster.train.coordinator import RunCoordinator
from cluster.train.data import DataSnapshot, snapshot_dataset
from cluster.train.exchange import HttpSyncSender, SyncResult
from cluster.train.progress import RunProgress, TrainState

log = logging.getLogger(__name__)


def coordinator_actor(run: TrainRunConfig, key: Ed25519Key, max_message_bytes: int,
                      peer_allowlist: EndpointAllowlist | None = None) -> Any:
    """The run's coordinator as an async actor (no CPU; dies with the ingress that owns it).
    Its messages go only to peers the endpoint policy allows (``peer_allowlist``)."""
    actor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1000)(RunCoordinator)
    sender = HttpSyncSender(guard=EndpointGuard.of(peer_allowlist))
    return actor.remote(run, key, run.exchange_dir, sender, max_message_bytes)


class RayWorkerEnv:
    """``cluster/train/loop.py::WorkerEnv`` inside a Ray Train worker."""

    def __init__(self, coordinator: Any, spec: WorkerSpec) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self._coordinator = coordinator
        self._device = "cuda" if spec.scaling.device == "cuda" else "cpu"
        self._run_dir = spec.run.checkpoint_root / spec.run.run_id
        self._stop_ref: Any = None
        self._stopping = False

    def _collective(self, tensors: list[Any], op: str) -> None:
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = _flatten_dense_tensors(tensors).to(self._device)
        if op == "sum":
            dist.all_reduce(flat)
        else:
            dist.broadcast(flat, src=0)
        with torch.no_grad():
            for t, v in zip(tensors, _unflatten_dense_tensors(flat.cpu(), tensors), strict=True):
                t.copy_(v)

    def all_reduce_sum(self, tensors: list[Any]) -> None:
        self._collective(tensors, "sum")

    def broadcast(self, tensors: list[Any]) -> None:
        self._collective(tensors, "broadcast")

    def started(self) -> None:
        ray.get(self._coordinator.worker_started.remote(self.rank, os.getpid(),
                                                        os.uname().nodename))

    def should_stop(self) -> bool:
        """Never blocks an inner step: the answer of the previous poll, a new poll sent."""
        if self._stopping:
            return True
        if self._stop_ref is not None:
            ready, _ = ray.wait([self._stop_ref], timeout=0)
            if not ready:
                return False
            self._stopping = bool(ray.get(self._stop_ref))
        self._stop_ref = self._coordinator.should_stop.remote()
        return self._stopping

    def progress(self, update: Mapping[str, Any]) -> None:
        self._coordinator.report.remote(dict(update))  # in order, not awaited

    def exchange(self, outer_step: int, payload: bytes) -> SyncResult:
        return ray.get(self._coordinator.exchange.remote(outer_step, payload))

    def failed_payload(self, sender: str, outer_step: int, error: str) -> None:
        ray.get(self._coordinator.failed_payload.remote(sender, outer_step, error))

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def save(self, directory: Path, metrics: Mapping[str, Any]) -> str:
        import ray.train

        name = f"outer-{int(metrics['outer_step']):06d}"
        ray.train.report({k: v for k, v in metrics.items() if v is not None},
                         checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=name)
        return str(self._run_dir / name)

    def checkpointed(self, outer_step: int, path: str, params_sha256: str) -> None:
        ray.get(self._coordinator.checkpointed.remote(outer_step, path, params_sha256))

    def finish(self, state: TrainState, model_dir: str | None, error: str | None) -> None:
        # awaited: the ingress reads the outcome once Ray Train returns
        ray.get(self._coordinator.finish.remote(state, model_dir, error))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function."""
    from cluster.train.loop import run_worker

    spec = WorkerSpec.model_validate(config["spec"])
    run_worker(spec, RayWorkerEnv(config["coordinator"], spec))


def torch_trainer(spec: WorkerSpec, coordinator: Any) -> Any:
    """The ``TorchTrainer`` of one node's run (built, not started)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    storage = spec.run.checkpoint_root
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "coordinator": coordinator},
        scaling_config=ScalingConfig(num_workers=scaling.workers,
                                     use_gpu=scaling.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=scaling.backend),
        run_config=RunConfig(
            name=spec.run.run_id, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


def worker_spec(run: TrainRunConfig, scaling: ScalingSpec, key: Ed25519Key,
                data: DataSnapshot) -> WorkerSpec:
    order = node_order(key.public_key, run.peers)
    return WorkerSpec(run=run, scaling=scaling, node_public_key=key.public_key,
                      node_index=order.index(key.public_key), node_count=len(order),
                      data_file=data.path)


class RayTrainingRun:
    """One training run of this node: its coordinator actor and its ``TorchTrainer``."""

    def __init__(self, run: TrainRunConfig, scaling: ScalingSpec, key: Ed25519Key,
                 max_message_bytes: int, postgres_url: str | None,
                 peer_allowlist: EndpointAllowlist | None = None) -> None:
        self.run = run
        self._coordinator = coordinator_actor(run, key, max_message_bytes, peer_allowlist)
        self._task = asyncio.ensure_future(self._main(scaling, key, postgres_url))

    async def _main(self, scaling: ScalingSpec, key: Ed25519Key,
                    postgres_url: str | None) -> None:
        try:
            data = await snapshot_dataset(self.run.dataset, self.run.data_file, postgres_url)
            await self._coordinator.set_data.remote(data.documents, data.sha256)
            if await self._coordinator.should_stop.remote():
                await self._coordinator.ended.remote()
                return
            trainer = torch_trainer(worker_spec(self.run, scaling, key, data), self._coordinator)
            started = time.monotonic()
            await asyncio.to_thread(trainer.fit)
            log.info("train.run.fit_returned run=%s s=%.1f", self.run.run_id,
                     time.monotonic() - started)
            await self._coordinator.ended.remote()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the run's outcome, shown in /train/status
            log.error("train.run.failed run=%s error=%s", self.run.run_id, exc)
            await self._coordinator.fail.remote(_short_error(exc))

    def done(self) -> bool:
        return self._task.done()

    async def status(self) -> RunProgress:
        return await self._coordinator.status.remote()

    async def receive(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        return await self._coordinator.receive.remote(dict(headers), body)

    async def stop(self, timeout_s: float) -> None:
        """Ask the workers to stop at their next inner step; wait up to ``timeout_s``."""
        if self._task.done():
            return
        await self._coordinator.request_stop.remote()
        await asyncio.wait([self._task], timeout=timeout_s)

    async def close(self) -> None:
        """Stop (briefly), then release the coordinator."""
        await self.stop(timeout_s=10.0)
        if not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._coordinator.close.remote()
        ray.kill(self._coordinator, no_restart=True)


def _short_error(exc: BaseException) -> str:
    """Ray Train wraps a worker's error in a long traceback: keep its last line."""
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    tail = lines[-1] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {tail}"[:2000]


class RayTrainingLauncher:
    """Starts this node's training runs on Ray Train (``TrainingLauncher`` of serving.py)."""

    def __init__(self, scaling: ScalingSpec, postgres_url: str | None,
                 max_message_bytes: int, *, peer_allowlist: EndpointAllowlist | None = None,
                 ) -> None:
        self._scaling = scaling
        self._postgres_url = postgres_url or os.environ.get("TESTBENCH_POSTGRES_URL")
        self._max_message_bytes = max_message_bytes
        self._peer_allowlist = peer_allowlist  # None: peers at public addresses only

    def start(self, run: TrainRunConfig, key: Ed25519Key) -> RayTrainingRun:
        return RayTrainingRun(run, self._scaling, key, self._max_message_bytes,
                              self._postgres_url, self._peer_allowlist)
