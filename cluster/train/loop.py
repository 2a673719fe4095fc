"""One worker's DiLoCo training loop. Plain torch; where it runs is injected (:class:`WorkerEnv`):
a Ray Train worker (``serve_apps/poc/training.py``), or one process (:class:`LocalWorkerEnv`).

Per outer step: H inner AdamW steps on this worker's shard; the pseudo-gradient
``global - local`` averaged over the node's workers (intra-node all-reduce); rank 0 signs
and exchanges the node's mean with the peers, averages every node's (weighted by workers,
in sorted key order) and broadcasts it; every worker takes the same outer Nesterov step;
rank 0 measures the held-out loss; every worker writes its part of the checkpoint. Rank 0
decides for the node whether to go on (a stop request, a failed sync) and broadcasts it, so
no worker is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from cluster.train.checkpoint import (
    WorkerState,
    load_checkpoint,
    read_info,
    save_checkpoint,
)
from cluster.train.config import WorkerSpec
from cluster.train.data import PackedCorpus, ShardedBatches, read_snapshot
from cluster.train.diloco import (
    Contribution,
    DilocoOuter,
    PayloadError,
    average,
    decode_payload,
    encode_payload,
)
from cluster.train.exchange import SyncFailed, SyncResult, SyncStopped
from cluster.train.export import export_model_dir
from cluster.train.progress import EvalPoint, TrainState

log = logging.getLogger(__name__)

GO, STOP, FAIL = 0, 1, 2


class WorkerEnv(Protocol):
    """Where a worker runs: its place in the node, collectives, and the node's coordinator."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum in place over the node's workers."""
        ...

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values, in place, on every worker of the node."""
        ...

    def started(self) -> None: ...

    def should_stop(self) -> bool: ...

    def progress(self, update: Mapping[str, Any]) -> None: ...

    def exchange(self, outer_step: int, payload: bytes) -> SyncResult: ...

    def failed_payload(self, sender: str, outer_step: int, error: str) -> None: ...

    def restore(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest checkpoint directory, if any."""
        ...

    def save(self, directory: Path, metrics: Mapping[str, Any]) -> str:
        """Persist this worker's checkpoint files; where the checkpoint now lives."""
        ...

    def checkpointed(self, outer_step: int, path: str, params_sha256: str) -> None: ...

    def finish(self, state: TrainState, model_dir: str | None, error: str | None) -> None: ...


@dataclass(frozen=True)
class WorkerOutcome:
    state: TrainState
    outer_step: int
    params_sha256: str
    model_dir: str | None = None
    error: str | None = None


def configure_torch(threads: int) -> None:
    """A fixed thread count and deterministic kernels: the same run gives the same bits."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int,
                 device: str) -> float:
    """Mean next-token loss over the held-out blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size].to(device)
        n = batch.numel() - batch.shape[0]  # predicted tokens
        total += float(model(input_ids=batch, labels=batch).loss) * n
        count += n
    if was_training:
        model.train()
    return total / count


# transformers' from_pretrained sets process-wide loading contexts (default device, tied
# weights): two threads loading at once can leave one model half on the meta device.
_LOAD_LOCK = threading.Lock()


def load_model(model_dir: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _LOAD_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.config.use_cache = False
    model.train()
    return model, tokenizer


def run_worker(spec: WorkerSpec, env: WorkerEnv) -> WorkerOutcome:
    """Train until the run's last outer step (or a stop, or a failed sync)."""
    run, hp, scaling = spec.run, spec.run.hyperparameters, spec.scaling
    configure_torch(scaling.threads)
    device = "cuda" if scaling.device == "cuda" else "cpu"
    rank, world = env.rank, env.world_size
    lead = rank == 0
    env.started()
    model, tokenizer = load_model(run.model, device)
    corpus = PackedCorpus.pack(read_snapshot(spec.data_file), tokenizer, hp.seq_len,
                               run.dataset.heldout_blocks)
    batches = ShardedBatches(corpus.train, hp.seed, spec.node_index, spec.node_count, rank,
                             world, hp.micro_batch_size)
    outer = DilocoOuter(model, hp.outer_lr, hp.outer_momentum)
    params = dict(model.named_parameters())
    inner_params = [params[n] for n in outer.names]
    inner = torch.optim.AdamW(inner_params, lr=hp.inner_lr, betas=hp.betas,
                              weight_decay=hp.weight_decay)
    state = WorkerState()
    with env.restore() as restored:
        if restored is not None:
            state = load_checkpoint(restored, run_id=run.run_id, rank=rank, world_size=world,
                                    outer=outer, inner=inner)
            log.info("train.worker.resumed run=%s rank=%d outer_step=%d", run.run_id, rank,
                     state.outer_step)
    if lead and not state.eval_losses:
        state.eval_losses.append(EvalPoint(
            outer_step=0, loss=heldout_loss(model, corpus.heldout, hp.micro_batch_size, device)))
    if lead:
        env.progress(_progress(state, world, outer.params_sha256(), 0.0))
    shapes = {n: g.shape for n, g in zip(outer.names, outer.global_params, strict=True)}

    def decide(local: int) -> int:
        """Rank 0's decision, on every worker."""
        if world == 1:
            return local
        flag = torch.tensor([local], dtype=torch.int64)
        env.broadcast([flag])
        return int(flag.item())

    while state.outer_step < hp.outer_steps:
        inner_s, inner_tokens = 0.0, 0
        for h in range(hp.inner_steps):
            if decide(STOP if lead and env.should_stop() else GO) == STOP:
                return _stopped(spec, env, outer, model, state)
            started = time.perf_counter()
            batch, cursor = batches.next(state.cursor)
            batch = batch.to(device)
            for group in inner.param_groups:
                group["lr"] = hp.inner_lr_at(state.inner_steps)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            if hp.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(inner_params, hp.grad_clip)
            inner.step()
            inner.zero_grad(set_to_none=True)
            inner_s += time.perf_counter() - started
            inner_tokens += batch.numel()
            state.inner_steps += 1
            state.cursor = cursor
            state.tokens += batch.numel()
            state.last_loss = float(loss.detach())
            if lead:
                env.progress({"step": state.inner_steps, "inner_step": h + 1,
                              "loss": state.last_loss, "tokens": state.tokens * world,
                              "tokens_per_s": inner_tokens * world / inner_s})
        # ---- the outer step ----
        pseudo = outer.pseudo_gradient()
        tensors = list(pseudo.values())
        if world > 1:
            env.all_reduce_sum(tensors)
            for t in tensors:
                t.div_(world)
        verdict, error = GO, None
        if lead:
            try:
                avg = _synced_average(spec, env, state.outer_step, pseudo, shapes, world)
                for name, t in zip(outer.names, tensors, strict=True):
                    t.copy_(avg[name])
            except SyncStopped:
                verdict = STOP
            except SyncFailed as exc:
                verdict, error = FAIL, str(exc)
        decision = decide(verdict)
        if decision == STOP:
            return _stopped(spec, env, outer, model, state)
        if decision == FAIL:
            outer.copy_to_local()
            if lead:
                env.finish(TrainState.FAILED, None, error)
            return WorkerOutcome(TrainState.FAILED, state.outer_step, outer.params_sha256(),
                                 error=error)
        if world > 1:
            env.broadcast(tensors)
        outer.step(dict(zip(outer.names, tensors, strict=True)))
        state.outer_step += 1
        sha = outer.params_sha256()
        if lead:
            state.eval_losses.append(EvalPoint(
                outer_step=state.outer_step,
                loss=heldout_loss(model, corpus.heldout, hp.micro_batch_size, device)))
        metrics = {"outer_step": state.outer_step, "loss": state.last_loss,
                   "eval_loss": state.eval_losses[-1].loss if lead else None,
                   "params_sha256": sha}
        with tempfile.TemporaryDirectory(prefix="diloco-ckpt-") as tmp:
            save_checkpoint(Path(tmp), run_id=run.run_id, rank=rank, world_size=world,
                            outer=outer, inner=inner, inner_params=inner_params, state=state)
            where = env.save(Path(tmp), metrics)
        if lead:
            env.checkpointed(state.outer_step, where, sha)
            env.progress(_progress(state, world, sha, inner_tokens * world / max(inner_s, 1e-9)))
    sha = outer.params_sha256()
    model_dir = _export(spec, model, state, sha, "completed") if lead else None
    if lead:
        env.finish(TrainState.COMPLETED, model_dir, None)
    return WorkerOutcome(TrainState.COMPLETED, state.outer_step, sha, model_dir=model_dir)


def _synced_average(spec: WorkerSpec, env: WorkerEnv, outer_step: int,
                    pseudo: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                    world: int) -> dict[str, torch.Tensor]:
    """Rank 0: sign and exchange the node's pseudo-gradient; the average of every usable
    node's (ours from the same bytes the peers received)."""
    dtype = spec.run.hyperparameters.sync_dtype
    payload = encode_payload(pseudo, dtype, world)
    result = env.exchange(outer_step, payload)
    contributions: list[Contribution] = []
    for sender, data in result.payloads.items():
        try:
            contributions.append(decode_payload(sender, data, shapes, dtype))
        except PayloadError as exc:
            if sender == spec.node_public_key:
                raise
            env.failed_payload(sender, outer_step, str(exc))
    if len(contributions) < spec.run.required_nodes:
        raise SyncFailed(f"outer step {outer_step}: {len(contributions)} usable pseudo-gradients,"
                         f" the run needs {spec.run.required_nodes} (min_nodes)")
    return average(contributions)


def _progress(state: WorkerState, world: int, sha: str, tokens_per_s: float) -> dict[str, Any]:
    return {"step": state.inner_steps, "outer_step": state.outer_step, "inner_step": 0,
            "loss": state.last_loss, "eval_loss": state.eval_losses[-1].loss,
            "eval_losses": [p.model_dump() for p in state.eval_losses],
            "tokens": state.tokens * world, "tokens_per_s": tokens_per_s, "params_sha256": sha}


def _export(spec: WorkerSpec, model: Any, state: WorkerState, sha: str, how: str) -> str:
    out = spec.run.model_dir
    record = {"run_id": spec.run.run_id, "outer_step": state.outer_step, "params_sha256": sha,
              "source_model": spec.run.model, "node_public_key": spec.node_public_key,
              "ended": how, "eval_losses": [p.model_dump() for p in state.eval_losses]}
    export_model_dir(model, Path(spec.run.model), out, record)
    return str(out)


def _stopped(spec: WorkerSpec, env: WorkerEnv, outer: DilocoOuter, model: Any,
             state: WorkerState) -> WorkerOutcome:
    """A stop between inner steps: the last checkpoint stands; rank 0 exports the global
    parameters of the last completed outer step."""
    outer.copy_to_local()
    sha = outer.params_sha256()
    model_dir = None
    if env.rank == 0:
        if state.outer_step > 0:
            model_dir = _export(spec, model, state, sha, "stopped")
        env.finish(TrainState.STOPPED, model_dir, None)
    return WorkerOutcome(TrainState.STOPPED, state.outer_step, sha, model_dir=model_dir)


class LocalWorkerEnv:
    """One worker in this process, no peers: checkpoints under ``checkpoint_root``
    (``outer-NNNNNN``), the newest restored. Tests and single-box runs."""

    rank = 0
    world_size = 1

    def __init__(self, public_key: str, checkpoint_root: Path,
                 stop_after_outer_steps: int | None = None) -> None:
        self.public_key = public_key
        self.checkpoint_root = checkpoint_root
        self.stop_after = stop_after_outer_steps
        self.updates: list[dict[str, Any]] = []
        self.outcome: tuple[TrainState, str | None, str | None] | None = None
        self._outer = 0

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        return None

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        return None

    def started(self) -> None:
        return None

    def should_stop(self) -> bool:
        return self.stop_after is not None and self._outer >= self.stop_after

    def progress(self, update: Mapping[str, Any]) -> None:
        self.updates.append(dict(update))

    def exchange(self, outer_step: int, payload: bytes) -> SyncResult:
        return SyncResult(outer_step=outer_step, payloads={self.public_key: payload})

    def failed_payload(self, sender: str, outer_step: int, error: str) -> None:
        raise AssertionError(f"a local run has no peers ({sender}: {error})")

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        dirs = sorted(d for d in self.checkpoint_root.glob("outer-*") if read_info(d))
        yield dirs[-1] if dirs else None

    def save(self, directory: Path, metrics: Mapping[str, Any]) -> str:
        step = int(metrics["outer_step"])
        self._outer = step
        out = self.checkpoint_root / f"outer-{step:06d}"
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(directory, tmp)
        os.replace(tmp, out)
        return str(out)

    def checkpointed(self, outer_step: int, path: str, params_sha256: str) -> None:
        return None

    def finish(self, state: TrainState, model_dir: str | None, error: str | None) -> None:
        self.outcome = (state, model_dir, error)


def worker_host() -> str:
    return socket.gethostname()
