"""Manager: plans what to measure per (node, task) and drives Sampler → Requester → Evaluator.

It owns its children through a ``Pipeline`` (Ray actors in production, plain objects in
unit tests), keeps its planning state in memory and rebuilds it from MongoDB when it is
restarted. Nothing it dispatches can be lost: prompts are in MongoDB before they are
sent, relays and samples are written idempotently under deterministic keys, and any
sample left pending (a crash anywhere) is re-driven from what MongoDB holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from actors import metrics
from actors.planning import NodeBudget, PairState, PlanItem, PlanLimits, backoff_s, plan_samples
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node, Prompt, Relay, SampleRequest, ScoreSamples, sample_key
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections

log = logging.getLogger(__name__)


class Pipeline(Protocol):
    """The Manager's children. ``prompts`` handles stay opaque (Ray object refs)."""

    async def sample(self, req: SampleRequest) -> tuple[list[int], Any]: ...
    async def relay_and_score(self, prompts: Any, node: Node) -> ScoreSamples: ...
    async def relay(self, prompts: list[Prompt], node: Node) -> list[Relay]: ...
    async def score(self, relays: list[Relay], node: Node) -> ScoreSamples: ...
    async def close(self) -> None: ...


class Manager:
    def __init__(
        self,
        settings: Settings,
        pipeline_factory: Callable[[Settings], Pipeline],
        stores: StoreConnections | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._cfg = settings.manager
        self._pipeline_factory = pipeline_factory
        self._pipeline: Pipeline | None = None
        self._stores = stores or StoreConnections(settings)
        self._clock = clock
        self._nodes: dict[str, Node] = {}
        self._nodes_read_at = -1e18
        self._states: dict[tuple[str, str], PairState] = {}
        self._budgets: dict[str, NodeBudget] = {}
        self._inflight_keys: set[str] = set()
        self._sample_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._ticks = 0
        self._counters = {"dispatched": 0, "samples": 0, "redriven": 0, "pipeline_errors": 0}
        self._limits = PlanLimits(
            target_samples=self._cfg.target_samples,
            max_in_flight=self._cfg.max_in_flight,
            sample_ttl_s=self._cfg.sample_ttl_s,
            node_budget_per_hour=self._cfg.node_budget_per_hour,
            dependencies=self._cfg.task_dependencies,
            task_targets=self._cfg.task_targets,
        )

    # ---- lifecycle -------------------------------------------------------------------
    async def ensure_started(self, loop: bool = True) -> None:
        """Connect, rebuild state from MongoDB, create children; idempotent."""
        async with self._start_lock:
            if not self._started:
                self._pipeline = self._pipeline_factory(self._settings)
                await self.rebuild()
                self._started = True
                # Everything pending now is an orphan of an earlier life: re-drive it all.
                await self._sweep(older_than=self._clock() + 1)
            if loop and (self._loop_task is None or self._loop_task.done()):
                self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pipeline is not None:
            await self._pipeline.close()
        await self._stores.close()

    async def _run_loop(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("manager.tick_failed")
            await asyncio.sleep(self._cfg.tick_s)

    async def rebuild(self) -> None:
        """Planning state from the samples of the current TTL window."""
        now = self._clock()
        mongo = await self._stores.mongo()
        rows = await mongo.samples.all_since(now - self._cfg.sample_ttl_s)
        self._states.clear()
        for row in sorted(rows, key=lambda r: r["created_at"]):
            if ErrorCode(row["error_code"]).counts_against_node:
                state = self._state(row["node_id"], row["task"])
                state.valid.append((row["created_at"], row["doc_id"]))
        await self._refresh_nodes(force=True)
        log.info("manager.rebuilt pairs=%d samples=%d", len(self._states), len(rows))

    # ---- planning --------------------------------------------------------------------
    def _state(self, node_id: str, task: str) -> PairState:
        key = (node_id, task)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = PairState()
        return state

    def _node_tasks(self, node: Node) -> list[str]:
        configured = (
            self._settings.diffusion_tasks if node.kind == "diffusion" else self._settings.tasks
        )
        if node.tasks is None:
            return list(configured)
        return [t for t in node.tasks if t in configured]

    async def _refresh_nodes(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._nodes_read_at < self._cfg.node_refresh_s:
            return
        mongo = await self._stores.mongo()
        nodes = await mongo.nodes.list()
        self._nodes = {n.node_id: n for n in nodes if n.enabled}
        self._nodes_read_at = now

    def plan(self, now: float) -> list[PlanItem]:
        node_tasks = [(nid, self._node_tasks(node)) for nid, node in self._nodes.items()]
        for nid in self._nodes:
            self._budgets.setdefault(nid, NodeBudget(window_start=now))
        return plan_samples(node_tasks, self._states, self._budgets, self._limits, now)

    async def tick(self) -> int:
        await self.ensure_started(loop=False)
        await self._refresh_nodes()
        now = self._clock()
        plan = self.plan(now)
        for item in plan:
            self._state(item.node_id, item.task).reserved += item.count
            self._spawn(self._dispatch(item))
        self._ticks += 1
        metrics.set_manager_queue(len(self._inflight_keys), planned=sum(i.count for i in plan))
        await self._sweep(older_than=now - self._cfg.redrive_after_s)
        if plan:
            log.info("manager.tick planned=%d docs=%d", len(plan), sum(i.count for i in plan))
        return len(plan)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- dispatch --------------------------------------------------------------------
    async def _dispatch(self, item: PlanItem) -> None:
        node = self._nodes.get(item.node_id)
        state = self._state(item.node_id, item.task)
        assert self._pipeline is not None
        now = self._clock()
        epoch = int(now // self._cfg.sample_ttl_s)
        if state.skip_epoch != epoch:
            state.skip, state.skip_epoch = set(), epoch
        lock = self._sample_locks.setdefault((item.node_id, item.task), asyncio.Lock())
        try:
            if node is None:
                return
            async with lock:
                exclude = state.in_flight | set(state.valid_doc_ids()) | state.skip
                req = SampleRequest(
                    node=node, task=item.task, count=item.count,
                    exclude_doc_ids=sorted(exclude), epoch=epoch, seed=self._cfg.seed,
                )
                doc_ids, prompts = await self._pipeline.sample(req)
                state.in_flight.update(doc_ids)
        except Exception:
            self._counters["pipeline_errors"] += 1
            log.exception("manager.sample_failed node=%s task=%s", item.node_id, item.task)
            return
        finally:
            state.reserved -= item.count
        keys = [sample_key(item.node_id, item.task, d, epoch) for d in doc_ids]
        self._inflight_keys.update(keys)
        self._counters["dispatched"] += len(doc_ids)
        try:
            try:
                result: ScoreSamples | None = await self._pipeline.relay_and_score(prompts, node)
            except Exception:
                self._counters["pipeline_errors"] += 1
                log.warning(
                    "manager.pipeline_failed node=%s task=%s docs=%d: re-driving from MongoDB",
                    item.node_id, item.task, len(keys), exc_info=True,
                )
                result = await self._redrive(node, keys)
            if result is not None:
                self._absorb(result)
        finally:
            state.in_flight.difference_update(doc_ids)
            self._inflight_keys.difference_update(keys)

    async def _redrive(self, node: Node, keys: list[str], attempts: int = 5) -> ScoreSamples | None:
        """Finish samples from what MongoDB holds: relay what has no relay, then score."""
        assert self._pipeline is not None
        delay = 0.5
        for attempt in range(attempts):
            try:
                mongo = await self._stores.mongo()
                by_key = await mongo.prompts.by_sample_keys(keys)
                prompts = [p for key in keys for p in by_key.get(key, [])]
                if not prompts:
                    return None
                have = await mongo.relays.get_for_prompts([p.prompt_id for p in prompts])
                missing = [p for p in prompts if p.prompt_id not in have]
                relays = list(have.values())
                if missing:
                    relays += await self._pipeline.relay(missing, node)
                self._counters["redriven"] += len(keys)
                return await self._pipeline.score(relays, node)
            except Exception:
                log.warning("manager.redrive_failed attempt=%d keys=%d", attempt, len(keys),
                            exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        return None

    async def _sweep(self, older_than: float) -> None:
        """Re-drive samples whose prompts are pending and that nothing here is driving."""
        mongo = await self._stores.mongo()
        pending = await mongo.prompts.pending_sample_keys(older_than)
        groups: dict[tuple[str, str], list[str]] = {}
        for key, node_id, task in pending:
            if key not in self._inflight_keys:
                groups.setdefault((node_id, task), []).append(key)
        for (node_id, task), keys in groups.items():
            node = self._nodes.get(node_id)
            if node is None:
                node = await mongo.nodes.get(node_id)
            if node is None:
                continue
            self._spawn(self._redrive_tracked(node, task, keys))
        metrics.set_manager_queue(
            len(self._inflight_keys), redriven=sum(len(keys) for keys in groups.values())
        )

    async def _redrive_tracked(self, node: Node, task: str, keys: list[str]) -> None:
        state = self._state(node.node_id, task)
        doc_ids = [int(k.split("|")[2]) for k in keys]
        state.in_flight.update(doc_ids)
        self._inflight_keys.update(keys)
        try:
            result = await self._redrive(node, keys)
            if result is not None:
                self._absorb(result)
        finally:
            state.in_flight.difference_update(doc_ids)
            self._inflight_keys.difference_update(keys)

    def _absorb(self, result: ScoreSamples) -> None:
        if not result.samples:
            return
        state = self._state(result.node_id, result.task)
        known = set(state.valid_doc_ids())
        for s in result.samples:
            self._counters["samples"] += 1
            if not s.error_code.counts_against_node:
                state.skip.add(s.doc_id)
                continue
            if s.doc_id not in known:
                state.valid.append((s.created_at, s.doc_id))
                known.add(s.doc_id)
            if s.error_code == ErrorCode.OK:
                state.consecutive_failures = 0
                state.backoff_until = 0.0
            else:
                state.consecutive_failures += 1
                wait = backoff_s(
                    state.consecutive_failures, self._cfg.failure_backoff_after,
                    self._cfg.backoff_base_s, self._cfg.backoff_max_s,
                )
                if wait:
                    state.backoff_until = self._clock() + wait

    # ---- status ----------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """Progress per (node, task); ``full`` when every buffer reached its target."""
        await self.ensure_started()
        now = self._clock()
        pairs = []
        full = bool(self._nodes)
        for nid, node in sorted(self._nodes.items()):
            for task in self._node_tasks(node):
                state = self._state(nid, task)
                valid = state.valid_count(now, self._cfg.sample_ttl_s)
                target = self._limits.target(task)
                pairs.append({
                    "node_id": nid, "task": task, "valid": valid,
                    "in_flight": len(state.in_flight), "target": target,
                    "backoff_s": max(0.0, state.backoff_until - now),
                })
                full = full and valid >= target
        return {"full": full, "ticks": self._ticks, "pairs": pairs, **self._counters}
