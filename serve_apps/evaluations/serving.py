"""The evaluations API's logic: tenants, runs, logs, results and the leaderboard.

:class:`EvaluationService` is a plain class over the stores; the routes are thin handlers
over it and the Serve replica only builds and starts it. It also owns the replica's
:class:`~cluster.evaluations.worker.EvaluationWorker`, which executes runs in the background
of the same event loop (``evaluations.max_concurrent_runs: 0`` makes an API-only replica).

A tenant is whoever holds one of the configured bearer tokens; a run belongs to the tenant
that submitted it, and another tenant gets the same 404 as for a run that does not exist,
so run ids leak nothing.

Endpoints: a run's endpoint must pass the tenant's endpoint policy when it is submitted
(400 ``endpoint_refused``), and every request of the run goes through the tenant's guard
(``cluster/evaluations/endpoints.py``). Errors tenants read never quote what an endpoint
answered (status, content type and size only): an allowlisted internal service's pages do
not leak through run errors.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from cluster.core.errors import TestbenchError
from cluster.core.evaluations import EvaluationRun, LogLine, RunState
from cluster.core.settings import RequesterSettings, Settings
from cluster.evaluations.endpoints import TenantGuards
from cluster.evaluations.results import with_samples
from cluster.evaluations.runner import EvaluationRunner, RelayRecorder
from cluster.evaluations.runs import (
    SpecError,
    available_tasks,
    check_spec,
    new_run,
    new_run_id,
    request_cancel,
    request_resume,
    request_suspend,
)
from cluster.evaluations.worker import EvaluationWorker
from cluster.nodes.policy import EndpointRefusedError
from cluster.storage.connections import StoreConnections
from cluster.storage.mongo import EvaluationStore
from cluster.tasks.lmeval import GroupPlan
from cluster.tasks.registry import catalog_of, configured_groups
from serve_apps.evaluations import protocol as wire
from serve_apps.evaluations.leaderboard import load_leaderboard

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0


class ApiError(TestbenchError):
    """A request the API refuses; carries its HTTP status and an OpenAI-style error."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_code = code
        self.param = param
        self.error_type = error_type


def _not_found(run_id: str) -> ApiError:
    return ApiError(404, f"no evaluation {run_id!r}", code="not_found", param="id",
                    error_type="not_found_error")


def overall_progress(run: EvaluationRun, now: float) -> wire.RunProgressOut:
    """Percent, count, elapsed and ETA of a run as of ``now``."""
    done = sum(p.done for p in run.progress)
    counted = all(p.total is not None for p in run.progress)
    total = sum(p.total or 0 for p in run.progress) if counted else None
    elapsed = None
    if run.started_at is not None:
        elapsed = max(0.0, (run.finished_at or now) - run.started_at)
    eta = None
    if run.state == RunState.RUNNING and run.eta_s is not None:
        eta = max(0.0, run.eta_s - (now - (run.progress_at or now)))
    percent = 100.0 if run.state == RunState.COMPLETE else run.percent
    return wire.RunProgressOut(
        percent=round(percent, 2), done=done, total=total,
        count=f"{done}/{total if total is not None else '?'}",
        elapsed_s=None if elapsed is None else round(elapsed, 3),
        eta_s=None if eta is None else round(eta, 3), updated_at=run.progress_at,
    )


def to_status(run: EvaluationRun, now: float | None = None) -> wire.EvaluationStatus:
    spec = run.spec
    return wire.EvaluationStatus(
        id=run.run_id,
        state=run.state.value,
        request=wire.EvaluationSpecOut(
            endpoint=spec.endpoint, model=spec.model, api=spec.api, tasks=list(spec.tasks),
            num_fewshot=spec.num_fewshot, limit=spec.limit, gen_kwargs=dict(spec.gen_kwargs),
            tokenizer=spec.tokenizer, apply_chat_template=spec.apply_chat_template,
            system_instruction=spec.system_instruction,
            fewshot_as_multiturn=spec.fewshot_as_multiturn,
            custom_tasks=[wire.CustomTaskOut(files=sorted(c.files), volume_path=c.volume_path)
                          for c in spec.custom_tasks],
        ),
        progress=[wire.TaskProgressOut(task=p.task, done=p.done, total=p.total, failed=p.failed)
                  for p in run.progress],
        overall=overall_progress(run, time.time() if now is None else now),
        cancel_requested=run.cancel_requested,
        suspend_requested=run.suspend_requested,
        error=run.error,
        attempts=run.attempts,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        updated_at=run.updated_at,
    )


def _sse(event: str, data: str, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


class EvaluationService:
    """Everything the evaluations routes do, over MongoDB, PostgreSQL and the worker."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        id_factory: Callable[[], str] = new_run_id,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._new_id = id_factory
        self._stores = StoreConnections(settings)
        self._store: EvaluationStore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._requester: Any = None
        self.worker: EvaluationWorker | None = None
        self._groups: list[GroupPlan] | None = None
        self.guards = TenantGuards(settings)
        # Checked in constant time; a token maps to exactly one tenant (config validates).
        self._tokens = {token: tenant for tenant, token in settings.evaluations.tenants.items()}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect, create indexes and start executing runs (unless API only)."""
        from actors.requester import loop_requester

        mongo = await self._stores.mongo()
        self._store = EvaluationStore(mongo, self._clock)
        await self._store.ensure_indexes()
        # Import lm-eval and index the task YAMLs now (seconds), not in the first request.
        tasks = await asyncio.to_thread(available_tasks, self.settings.datasets_dir)
        log.info("evaluations.started tasks=%s", ",".join(tasks))
        cfg = self.settings.evaluations
        if cfg.max_concurrent_runs > 0:
            await self._stores.datasets()  # fail at start, not at the first run
            # One thread for lm-eval's CPU-bound, not-async Task machinery and tokenizer.
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmeval")
            requester_settings: RequesterSettings = self.settings.requester.model_copy(update={
                "per_node_concurrency": cfg.per_run_concurrency,
            })
            self._requester = loop_requester(requester_settings, RelayRecorder(self._store),
                                             quote_bodies=False)
            runner = EvaluationRunner(self.settings, self._stores, self._store, self._requester,
                                      self._executor, self._clock,
                                      guards=self.guards.for_tenant)
            self.worker = EvaluationWorker(cfg, self._store, runner, clock=self._clock)
            self.worker.start()
        if not self._tokens:
            log.warning("evaluations.no_tenants: every /v1/evaluations request gets 401")

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        if self._requester is not None:
            await self._requester.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        await self._stores.close()

    def check_health(self) -> None:
        """Raises when the run executor died, so Serve replaces the replica."""
        if self.worker is not None and not self.worker.healthy():
            raise RuntimeError("the evaluation worker loop is not running")

    def health(self) -> wire.HealthResponse:
        worker = self.worker
        return wire.HealthResponse(
            owner=worker.owner if worker else None,
            active_runs=len(worker.active_runs) if worker else 0,
        )

    @property
    def store(self) -> EvaluationStore:
        if self._store is None:
            raise ApiError(503, "the service is starting", code="starting",
                           error_type="server_error")
        return self._store

    # ------------------------------------------------------------------ tenants
    def authenticate(self, token: str | None) -> str:
        """The tenant holding ``token``; ApiError 401 otherwise."""
        if token:
            for known, tenant in self._tokens.items():
                if hmac.compare_digest(known.encode(), token.encode()):
                    return tenant
        raise ApiError(401, "a valid bearer token is required (Authorization: Bearer ...)",
                       code="unauthorized", error_type="authentication_error")

    async def _owned(self, tenant: str, run_id: str) -> EvaluationRun:
        run = await self.store.get(run_id)
        if run is None or run.tenant != tenant:
            raise _not_found(run_id)
        return run

    # ------------------------------------------------------------------ runs
    async def submit(self, tenant: str, request: wire.EvaluationRequest) -> wire.EvaluationStatus:
        try:
            spec = request.to_spec()
        except ValidationError as exc:  # the wire model let through what the run cannot hold
            first = exc.errors(include_url=False, include_input=False)[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise ApiError(422, f"{param or 'body'}: {first.get('msg', 'invalid')}",
                           code="invalid_request", param=param) from exc
        if spec.limit is not None and spec.limit > self.settings.evaluations.max_limit:
            raise ApiError(400, f"limit exceeds this deployment's maximum of "
                           f"{self.settings.evaluations.max_limit}", code="invalid_value",
                           param="limit")
        if len(spec.tasks) > self.settings.evaluations.max_tasks:
            raise ApiError(400, f"at most {self.settings.evaluations.max_tasks} tasks per run",
                           code="invalid_value", param="tasks")
        try:
            # lm-eval's TaskManager imports and indexes YAMLs: keep it off the event loop.
            leaves = await asyncio.to_thread(check_spec, spec, self.settings)
        except SpecError as exc:
            code = "too_large" if exc.status == 413 else "invalid_value"
            raise ApiError(exc.status, str(exc), code=code, param=exc.param) from exc
        try:
            await self.guards.for_tenant(tenant).check_url(spec.endpoint)
        except EndpointRefusedError as exc:
            raise ApiError(400, f"{exc} (for tenant {tenant})", code="endpoint_refused",
                           param="endpoint") from exc
        run = new_run(spec, tenant, self._new_id(), float(self._clock()), leaves)
        # The first line before the run exists: no replica can log ahead of it.
        await self.store.append_log(run.run_id, f"queued by tenant {tenant}")
        await self.store.create(run)
        log.info("evaluations.submitted run=%s tenant=%s tasks=%s limit=%s",
                 run.run_id, tenant, ",".join(spec.tasks), spec.limit)
        if self.worker is not None:
            self.worker.wake()
        return to_status(run, float(self._clock()))

    async def status(self, tenant: str, run_id: str) -> wire.EvaluationStatus:
        return to_status(await self._owned(tenant, run_id), float(self._clock()))

    async def list_runs(
        self, tenant: str, state: str | None, offset: int, limit: int
    ) -> wire.EvaluationList:
        runs, total = await self.store.list(
            tenant, state=RunState(state) if state else None, offset=offset, limit=limit
        )
        next_offset = offset + len(runs) if offset + len(runs) < total else None
        now = float(self._clock())
        return wire.EvaluationList(data=[to_status(r, now) for r in runs], total=total,
                                   offset=offset, limit=limit, next_offset=next_offset)

    async def cancel(self, tenant: str, run_id: str) -> wire.EvaluationStatus:
        run = await self._owned(tenant, run_id)
        if run.state in (RunState.COMPLETE, RunState.FAILED):
            raise ApiError(409, f"evaluation {run_id} already {run.state.value}",
                           code="already_finished", param="id")
        updated = await request_cancel(self.store, run_id, float(self._clock()))
        if updated is None:
            raise _not_found(run_id)
        if updated.cancel_requested and not run.cancel_requested:
            await self.store.append_log(run_id, f"cancel requested by tenant {tenant}")
            log.info("evaluations.cancel_requested run=%s state=%s", run_id, updated.state.value)
        if self.worker is not None:
            self.worker.wake()
        return to_status(updated, float(self._clock()))

    async def suspend(self, tenant: str, run_id: str) -> wire.EvaluationStatus:
        """Stop a run without losing its work (suspended until resumed); 409 once ended."""
        run = await self._owned(tenant, run_id)
        if run.state.terminal:
            raise ApiError(409, f"evaluation {run_id} already {run.state.value}",
                           code="already_finished", param="id")
        updated = await request_suspend(self.store, run_id)
        if updated is None:
            raise _not_found(run_id)
        if updated.rev != run.rev:
            await self.store.append_log(run_id, f"suspend requested by tenant {tenant}")
            log.info("evaluations.suspend_requested run=%s state=%s", run_id,
                     updated.state.value)
        if self.worker is not None:
            self.worker.wake()
        return to_status(updated, float(self._clock()))

    async def resume(self, tenant: str, run_id: str) -> wire.EvaluationStatus:
        """Make a suspended run runnable again (no effect on a run that is not); 409 once
        ended. Docs scored and requests answered before are not repeated."""
        run = await self._owned(tenant, run_id)
        if run.state.terminal:
            raise ApiError(409, f"evaluation {run_id} already {run.state.value}",
                           code="already_finished", param="id")
        updated = await request_resume(self.store, run_id)
        if updated is None:
            raise _not_found(run_id)
        if updated.rev != run.rev:
            await self.store.append_log(run_id, f"resumed by tenant {tenant}")
            log.info("evaluations.resumed run=%s state=%s", run_id, updated.state.value)
        if self.worker is not None:
            self.worker.wake()
        return to_status(updated, float(self._clock()))

    async def results(self, tenant: str, run_id: str, samples: bool) -> dict[str, Any]:
        run = await self._owned(tenant, run_id)
        if run.state != RunState.COMPLETE:
            detail = f" ({run.error})" if run.error else ""
            raise ApiError(409, f"evaluation {run_id} is {run.state.value}{detail}; results "
                           "exist once it is complete", code="no_results", param="id")
        results = await self.store.results(run_id)
        if results is None:  # written before the state flips: only a lost write gets here
            raise ApiError(409, f"evaluation {run_id} has no stored results", code="no_results",
                           param="id")
        if samples:
            results = with_samples(results, await self.store.samples(run_id))
        return results

    async def log_events(
        self, tenant: str, run_id: str, after: str | None, follow: bool
    ) -> AsyncIterator[bytes]:
        """The run's log as server-sent events (checked before the stream starts).

        ``log`` events carry a :class:`~serve_apps.evaluations.protocol.LogEvent` and the
        line's key as ``id`` (a client resumes with ``Last-Event-ID``); with ``follow`` the
        stream stays open until the run ends, then sends one ``end`` event.
        """
        await self._owned(tenant, run_id)
        return self._stream_logs(run_id, after, follow)

    async def _stream_logs(
        self, run_id: str, after: str | None, follow: bool
    ) -> AsyncIterator[bytes]:
        store, poll_s = self.store, min(self.settings.evaluations.poll_s, 1.0)
        idle_s = 0.0
        while True:
            lines = await store.logs_after(run_id, after)
            for line in lines:
                yield self._log_event(line)
                after = line.key
            run = await store.get(run_id)
            if run is None:
                return
            if run.state.terminal:
                for line in await store.logs_after(run_id, after):
                    yield self._log_event(line)
                end = wire.EndEvent(state=run.state.value, error=run.error)
                yield _sse("end", end.model_dump_json())
                return
            if not follow:
                return
            idle_s = 0.0 if lines else idle_s + poll_s
            if idle_s >= KEEPALIVE_S:  # proxies drop silent connections
                idle_s = 0.0
                yield b": keep-alive\n\n"
            await asyncio.sleep(poll_s)

    @staticmethod
    def _log_event(line: LogLine) -> bytes:
        data = wire.LogEvent(ts=line.ts, level=line.level, message=line.message)
        return _sse("log", json.dumps(data.model_dump(mode="json"), ensure_ascii=True), line.key)

    # ------------------------------------------------------------------ leaderboard
    async def leaderboard(self) -> wire.LeaderboardResponse:
        cfg = self.settings.evaluations
        if self._groups is None:  # resolving may index lm-eval's built-in tasks: once
            self._groups = await asyncio.to_thread(
                configured_groups, self.settings.tasks, catalog_of(self.settings))
        return await load_leaderboard(
            await self._stores.mongo(),
            window=self.settings.manager.target_samples,
            history_s=cfg.leaderboard_history_s,
            max_samples=cfg.leaderboard_max_samples,
            now=float(self._clock()),
            groups=self._groups,
        )
