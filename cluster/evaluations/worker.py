"""The run executor of one process (a Serve replica, or the CLI): claims, leases, cancels.

Every ``poll_s`` the worker renews the leases of the runs it executes (noticing cancel and
suspend requests and runs another process took over) and claims new runs, or scheduled and
running runs whose owner's lease ran out, up to ``max_concurrent_runs``. A claimed run is
scheduled until its runner has counted its docs and starts sending (then running). A
suspend request stops the run's task like a cancel but leaves it suspended and held by
nobody; a resumed run is new again and resumes like any claimed run (docs scored and
requests answered are not repeated). All writes are compare-and-swap
replaces of the run document (:meth:`EvaluationStore.mutate`), so a cancel from the API and
a progress write from the owner never lose each other.

A replica that dies keeps its runs until their lease ends; then any replica, its own
restarted self included, claims and resumes them. A replica shut down gracefully releases
its leases at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Literal

from cluster.core.errors import TestbenchError
from cluster.core.evaluations import EvaluationRun, RunState, TaskProgress
from cluster.core.settings import EvaluationSettings
from cluster.evaluations.runner import EvaluationRunner, LeaseLostError
from cluster.storage.mongo import EvaluationStore

log = logging.getLogger(__name__)

StopReason = Literal["cancel", "suspend", "lost", "shutdown"]


def new_owner_id() -> str:
    """Unique per process start: a restarted replica must not pass for its dead self."""
    return f"{socket.gethostname()}-{secrets.token_hex(4)}"


class StoreReporter:
    """Progress and log lines of a run, written to MongoDB while this owner holds it."""

    def __init__(
        self,
        store: EvaluationStore,
        run_id: str,
        owner: str,
        on_change: Callable[[EvaluationRun], None] | None = None,
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._owner = owner
        self._on_change = on_change

    async def progress(self, task: str, done: int, total: int, failed: int) -> None:
        def change(run: EvaluationRun) -> bool:
            if run.owner != self._owner or not run.state.active:
                return False
            item = run.progress_of(task)
            if (item.done, item.total, item.failed) == (done, total, failed):
                return False
            item.done, item.total, item.failed = done, total, failed
            return True

        run = await self._store.mutate(self._run_id, change)
        if run is None or run.owner != self._owner:
            raise LeaseLostError(f"run {self._run_id} is no longer held by {self._owner}")
        if self._on_change is not None:
            self._on_change(run)

    async def meter(
        self, progress: list[TaskProgress], percent: float, eta_s: float | None, now: float,
        running: bool,
    ) -> None:
        """Every task's progress, the percent done and the ETA in one write; ``running``:
        the run is sending requests (scheduled → running)."""

        def change(run: EvaluationRun) -> bool:
            if run.owner != self._owner or not run.state.active:
                return False
            run.progress = [p.model_copy() for p in progress]
            run.percent, run.eta_s, run.progress_at = percent, eta_s, now
            if running:
                run.state = RunState.RUNNING
            return True

        run = await self._store.mutate(self._run_id, change)
        if run is None or run.owner != self._owner or not run.state.active:
            raise LeaseLostError(f"run {self._run_id} is no longer held by {self._owner}")
        if self._on_change is not None:
            self._on_change(run)

    async def log(self, message: str, level: str = "info") -> None:
        log.log(logging.WARNING if level == "error" else logging.INFO,
                "evaluations.run.log run=%s %s", self._run_id, message)
        await self._store.append_log(self._run_id, message, level=level)


async def finish_run(
    store: EvaluationStore,
    run_id: str,
    owner: str,
    state: RunState,
    now: float,
    error: str | None = None,
) -> EvaluationRun | None:
    """Move a run this owner holds to a terminal state; None if it holds it no longer."""

    def change(run: EvaluationRun) -> bool:
        if run.owner != owner or run.state.terminal:
            return False
        run.state, run.finished_at, run.error = state, now, error
        run.owner, run.lease_until = None, 0.0
        return True

    run = await store.mutate(run_id, change)
    return run if run is not None and run.state == state and run.finished_at == now else None


async def claim_run(
    store: EvaluationStore, run_id: str, owner: str, now: float, lease_s: float
) -> EvaluationRun | None:
    """Take a new run, or a scheduled or running one whose lease ran out (it is scheduled
    then); None if someone else did.

    A run whose cancel (suspend) was requested while nobody held it is cancelled
    (suspended) here instead.
    """

    def change(run: EvaluationRun) -> bool:
        if run.state.terminal or run.state == RunState.SUSPENDED or run.lease_until >= now:
            return False
        if run.cancel_requested:
            run.state, run.finished_at = RunState.CANCELLED, now
            run.owner, run.lease_until = None, 0.0
            return True
        if run.suspend_requested:
            run.state, run.suspend_requested = RunState.SUSPENDED, False
            run.owner, run.lease_until, run.eta_s = None, 0.0, None
            return True
        run.state = RunState.SCHEDULED
        run.started_at = run.started_at or now
        run.owner, run.lease_until = owner, now + lease_s
        run.attempts += 1
        return True

    run = await store.mutate(run_id, change)
    if run is None or run.owner != owner or run.state != RunState.SCHEDULED:
        return None
    return run


async def suspend_run(
    store: EvaluationStore, run_id: str, owner: str
) -> EvaluationRun | None:
    """Leave a run this owner stopped suspended and held by nobody; None if it holds it no
    longer (or a cancel came first: the cancel wins)."""

    def change(run: EvaluationRun) -> bool:
        if run.owner != owner or not run.state.active:
            return False
        if run.cancel_requested:
            return False
        run.state, run.suspend_requested = RunState.SUSPENDED, False
        run.owner, run.lease_until, run.eta_s = None, 0.0, None
        return True

    run = await store.mutate(run_id, change)
    return run if run is not None and run.state == RunState.SUSPENDED else None


class EvaluationWorker:
    """Executes claimed runs with an :class:`EvaluationRunner` as asyncio tasks."""

    def __init__(
        self,
        settings: EvaluationSettings,
        store: EvaluationStore,
        runner: EvaluationRunner,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        self._runner = runner
        self.owner = owner or new_owner_id()
        self._clock = clock
        self._active: dict[str, asyncio.Task[None]] = {}
        self._reasons: dict[str, StopReason] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    @property
    def active_runs(self) -> list[str]:
        return sorted(self._active)

    def healthy(self) -> bool:
        """False once the polling loop died (Serve's health check restarts the replica)."""
        task = self._loop_task
        return task is not None and not task.done()

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._poll_forever())
            log.info("evaluations.worker.started owner=%s max_runs=%d",
                     self.owner, self._settings.max_concurrent_runs)

    def wake(self) -> None:
        """Poll now (a run was submitted or a cancel requested on this replica)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop executing; runs in progress keep their state and are released at once."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for run_id, task in list(self._active.items()):
            self._reasons.setdefault(run_id, "shutdown")
            task.cancel()
        if self._active:
            await asyncio.gather(*self._active.values(), return_exceptions=True)
        log.info("evaluations.worker.stopped owner=%s", self.owner)

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a MongoDB hiccup must not end the worker
                log.exception("evaluations.worker.tick_failed owner=%s", self.owner)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_s)

    async def tick(self) -> None:
        """Renew leases, stop cancelled or lost runs, claim new ones."""
        for run_id in list(self._active):
            reason = await self._renew(run_id)
            if reason is not None and run_id not in self._reasons:
                self._reasons[run_id] = reason
                self._active[run_id].cancel()
        free = self._settings.max_concurrent_runs - len(self._active)
        if free <= 0 or self._stopping:
            return
        now = float(self._clock())
        for candidate in await self._store.claimable(now, limit=free * 4):
            if len(self._active) >= self._settings.max_concurrent_runs:
                break
            if candidate.run_id in self._active:
                continue
            run = await claim_run(
                self._store, candidate.run_id, self.owner, now, self._settings.lease_s
            )
            if run is not None:
                self._launch(run)

    async def _renew(self, run_id: str) -> StopReason | None:
        now = float(self._clock())
        lease_s = self._settings.lease_s
        outcome: list[StopReason] = []

        def change(run: EvaluationRun) -> bool:
            if run.owner != self.owner or not run.state.active:
                outcome.append("lost")
                return False
            if run.cancel_requested:
                outcome.append("cancel")
                return False
            if run.suspend_requested:
                outcome.append("suspend")
                return False
            # Renew once half the lease is gone: a read per tick, a write per lease/2.
            if run.lease_until - now > lease_s / 2:
                return False
            run.lease_until = now + lease_s
            return True

        run = await self._store.mutate(run_id, change)
        if run is None:
            return "lost"
        return outcome[-1] if outcome else None

    def _launch(self, run: EvaluationRun) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(run))
        self._active[run.run_id] = task
        task.add_done_callback(lambda _: self._active.pop(run.run_id, None))

    async def _execute(self, run: EvaluationRun) -> None:
        run_id = run.run_id
        reporter = StoreReporter(self._store, run_id, self.owner)
        try:
            await reporter.log(
                f"running on {self.owner} (attempt {run.attempts}): "
                f"{', '.join(run.spec.tasks)} at {run.spec.endpoint} ({run.spec.model})"
            )
            results = await self._runner.run(run, reporter)
            await self._store.save_results(run_id, results)
            # Log before the state flips: a log stream ends at the terminal state.
            await reporter.log("succeeded")
            await finish_run(self._store, run_id, self.owner, RunState.COMPLETE,
                             float(self._clock()))
        except asyncio.CancelledError:
            reason = self._reasons.pop(run_id, "shutdown")
            await asyncio.shield(self._after_stop(run_id, reason))
        except LeaseLostError:
            log.warning("evaluations.run.lease_lost run=%s owner=%s", run_id, self.owner)
        except Exception as exc:  # noqa: BLE001 - any failure ends the run as failed
            if isinstance(exc, TestbenchError):
                message = str(exc)
            else:
                log.exception("evaluations.run.crashed run=%s", run_id)
                message = f"internal error: {type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                await reporter.log(f"failed: {message}", level="error")
            await finish_run(self._store, run_id, self.owner, RunState.FAILED,
                             float(self._clock()), error=message[:2000])
        finally:
            self._reasons.pop(run_id, None)

    async def _after_stop(self, run_id: str, reason: StopReason) -> None:
        try:
            if reason == "cancel":
                await self._store.append_log(run_id, "cancelled")
                await finish_run(self._store, run_id, self.owner, RunState.CANCELLED,
                                 float(self._clock()))
            elif reason == "suspend":
                await self._store.append_log(run_id, "suspended")
                if await suspend_run(self._store, run_id, self.owner) is None:
                    # a cancel arrived meanwhile: it wins
                    await finish_run(self._store, run_id, self.owner, RunState.CANCELLED,
                                     float(self._clock()))
            elif reason == "shutdown":
                await self._release(run_id)
        except Exception:  # noqa: BLE001 - the lease runs out anyway
            log.exception("evaluations.run.stop_failed run=%s reason=%s", run_id, reason)

    async def _release(self, run_id: str) -> None:
        def change(run: EvaluationRun) -> bool:
            if run.owner != self.owner or not run.state.active:
                return False
            run.owner, run.lease_until = None, 0.0
            return True

        await self._store.mutate(run_id, change)
        await self._store.append_log(run_id, f"released by {self.owner} (shutting down)")
