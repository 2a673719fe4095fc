"""One node's training run as its workers and its control API see it: progress, the stop
flag, and the peer exchange. A plain async class: ``serve_apps/poc/training.py`` runs it as
a Ray actor between the node's ingress and its Ray Train workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cluster.auth.keys import Ed25519Key
from cluster.auth.sync_messages import SyncRefused
from cluster.train.config import TrainRunConfig
from cluster.train.exchange import PeerExchange, SyncResult, SyncSender
from cluster.train.progress import (
    CheckpointRecord,
    EvalPoint,
    RunProgress,
    TrainState,
    WorkerRecord,
)

log = logging.getLogger(__name__)

# Fields a worker's progress update may set (rank 0, every inner step).
PROGRESS_FIELDS = frozenset({"step", "outer_step", "inner_step", "loss", "eval_loss", "tokens",
                             "tokens_per_s", "params_sha256"})


class RunCoordinator:
    def __init__(
        self,
        run: TrainRunConfig,
        key: Ed25519Key,
        exchange_dir: Path,
        sender: SyncSender,
        max_message_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run = run
        self._clock = clock
        self.exchange_state = PeerExchange(run, key, exchange_dir, sender, max_message_bytes,
                                           clock=clock)
        now = clock()
        self.progress = RunProgress(run_id=run.run_id, node_public_key=key.public_key,
                                    outer_steps=run.hyperparameters.outer_steps,
                                    inner_steps=run.hyperparameters.inner_steps,
                                    started_at=now, updated_at=now)
        self._stop = False

    # ---- the workers' side ---------------------------------------------------------------
    def worker_started(self, rank: int, pid: int, host: str) -> None:
        now = self._clock()
        workers = [w for w in self.progress.workers if w.rank != rank]
        workers.append(WorkerRecord(rank=rank, pid=pid, host=host, started_at=now))
        self.progress.workers = sorted(workers, key=lambda w: w.rank)
        self.progress.worker_starts += 1
        if self.progress.state == TrainState.STARTING:
            self.progress.state = TrainState.RUNNING
        self.progress.updated_at = now

    def report(self, update: Mapping[str, Any]) -> None:
        unknown = set(update) - PROGRESS_FIELDS - {"eval_losses"}
        if unknown:
            raise ValueError(f"unknown progress fields {sorted(unknown)}")
        for name, value in update.items():
            if name == "eval_losses":
                self.progress.eval_losses = [EvalPoint.model_validate(p) for p in value]
            else:
                setattr(self.progress, name, value)
        self.progress.updated_at = self._clock()

    def should_stop(self) -> bool:
        return self._stop

    async def exchange(self, outer_step: int, payload: bytes) -> SyncResult:
        return await self.exchange_state.exchange(outer_step, payload)

    def failed_payload(self, sender: str, outer_step: int, error: str) -> None:
        self.exchange_state.failed_payload(sender, outer_step, error)

    def checkpointed(self, outer_step: int, path: str, params_sha256: str) -> None:
        self.progress.last_checkpoint = CheckpointRecord(
            outer_step=outer_step, path=path, params_sha256=params_sha256, at=self._clock())
        self.progress.updated_at = self._clock()

    def finish(self, state: TrainState, model_dir: str | None = None,
               error: str | None = None) -> None:
        """The run's outcome as the workers saw it (rank 0)."""
        self.progress.state = state
        if model_dir is not None:
            self.progress.model_dir = model_dir
        if error is not None:
            self.progress.error = error
        self.progress.updated_at = self._clock()
        log.info("train.run.finished run=%s state=%s error=%s", self.run.run_id, state, error)

    # ---- the control API's side ----------------------------------------------------------
    async def receive(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """A peer's sync message: (HTTP status, JSON answer)."""
        try:
            env = await self.exchange_state.receive(headers, body)
        except SyncRefused as refused:
            log.info("train.sync.refused run=%s reason=%s", self.run.run_id, refused)
            return refused.status, refused.body()
        return 200, {"status": "accepted", "run_id": env.run_id, "outer_step": env.outer_step}

    def request_stop(self) -> None:
        self._stop = True
        self.exchange_state.stop()
        if self.progress.state.active:
            self.progress.state = TrainState.STOPPING
        self.progress.updated_at = self._clock()

    def set_data(self, documents: int, sha256: str) -> None:
        self.progress.data_documents = documents
        self.progress.data_sha256 = sha256

    def fail(self, error: str) -> None:
        """The run ended without the workers reporting why (a crash, a start failure)."""
        if self.progress.state.active:
            self.finish(TrainState.STOPPED if self._stop else TrainState.FAILED, error=error)

    def ended(self) -> None:
        """Ray Train returned: a run that was stopping is stopped."""
        if self.progress.state == TrainState.STOPPING:
            self.finish(TrainState.STOPPED)
        elif self.progress.state.active:
            self.finish(TrainState.FAILED, error="the workers ended without a result")

    def status(self) -> RunProgress:
        progress = self.progress.model_copy()
        progress.peers = self.exchange_state.peers()
        return progress

    async def close(self) -> None:
        await self.exchange_state.close()
