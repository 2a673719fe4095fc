"""Manager: plans what to measure per (node, task) and drives Sampler → Requester → Evaluator.

It owns its children through a ``Pipeline`` (Ray actors in production, plain objects in
unit tests), keeps its planning state in memory and rebuilds it from MongoDB when it is
restarted. Nothing it dispatches can be lost: prompts are in MongoDB before they are
sent, relays and samples are written idempotently under deterministic keys, and any
sample left pending (a crash anywhere) is re-driven from what MongoDB holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

from actors import metrics
from actors.planning import NodeBudget, PairState, PlanItem, PlanLimits, backoff_s, plan_samples
from actors.scheduled_checks import ScheduledChecks
from cluster.core.errors import ErrorCode
from cluster.core.schemas import (
    Node,
    Prompt,
    Relay,
    Sample,
    SampleDraw,
    SampleRequest,
    sample_key,
)
from cluster.core.settings import Settings
from cluster.core.streaming import StreamingJob
from cluster.storage.connections import StoreConnections
from cluster.tasks.registry import catalog_of, leaf_task_names

log = logging.getLogger(__name__)

MIN_TICK_GAP_S = 0.05


RELAYED = "relayed"  # event payload: the sample keys whose relays are all recorded
SCORED = "scored"  # event payload: list[Sample]


class Pipeline(Protocol):
    """The Manager's children. A batch's handoff (prompts and their docs) stays opaque:
    Ray object refs in production, plain values in process. ``relay_and_score`` yields
    ``(RELAYED, sample keys)`` as docs are answered and ``(SCORED, samples)`` as they are
    scored."""

    async def sample(self, reqs: Sequence[SampleRequest]) -> tuple[list[SampleDraw], Any]: ...
    def relay_and_score(
        self, handoff: Any, nodes: Mapping[str, Node]
    ) -> AsyncIterator[tuple[str, Any]]: ...
    async def relay(self, prompts: list[Prompt], nodes: Mapping[str, Node]) -> list[Relay]: ...
    async def score(self, relays: list[Relay], nodes: Mapping[str, Node]) -> list[Sample]: ...
    async def warm_up(self, pairs: Sequence[tuple[Node, str]]) -> None: ...
    async def build_stats(self) -> dict[str, float]: ...
    # the Auditor child: scheduled honesty steps (actors/scheduled_checks.py)
    async def verify(self, nodes: Sequence[Node]) -> dict[str, Any]: ...
    async def audit(self, jobs: Sequence[StreamingJob]) -> dict[str, Any]: ...
    async def reference_docs(self) -> dict[str, Any]: ...
    async def check_traffic(self, nodes: Sequence[Node]) -> dict[str, Any]: ...
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
        # (kind, the node's own task list) -> its leaf tasks: every tick plans every node,
        # and resolving groups against the catalog per node and tick cost more than the plan
        self._leaf_tasks: dict[tuple[str, tuple[str, ...] | None], list[str]] = {}
        self._budgets: dict[str, NodeBudget] = {}
        self._inflight_keys: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._ticks = 0
        self._counters = {"dispatched": 0, "samples": 0, "redriven": 0, "pipeline_errors": 0,
                          "unmeasurable": 0}
        self._swept_at = -1e18
        self._wake: asyncio.Event | None = None
        # Set whenever progress can have changed (docs answered, scored or released, a
        # tick, a pair found unmeasurable): what ``status(wait_s=...)`` waits on.
        self._progress = asyncio.Event()
        self._warm_s: float | None = None
        # Orphans are older than redrive_after_s by definition: looking a few times per
        # that period is enough, and spares MongoDB a query every tick.
        self._sweep_every_s = max(settings.manager.tick_s, settings.manager.redrive_after_s / 4)
        self._checks = ScheduledChecks(settings, clock)
        self._limits = PlanLimits(
            target_samples=self._cfg.target_samples,
            max_in_flight=self._cfg.max_in_flight,
            sample_ttl_s=self._cfg.sample_ttl_s,
            node_budget_per_hour=self._cfg.node_budget_per_hour,
            dependencies=self._cfg.task_dependencies,
            task_targets=self._cfg.task_targets,
            refill_docs=self._cfg.refill_docs,
        )

    # ---- lifecycle -------------------------------------------------------------------
    async def ensure_started(self, loop: bool = True) -> None:
        """Connect, rebuild state from MongoDB, create children; idempotent."""
        async with self._start_lock:
            if not self._started:
                self._pipeline = self._pipeline_factory(self._settings)
                await self.rebuild()
                self._started = True
                # Children load lm-eval, tasks and tokenizers (seconds each) while the
                # first batches are planned, not when the first relays come back.
                self._spawn(self._warm_up())
                # Everything pending now is an orphan of an earlier life: re-drive it all.
                await self._sweep(older_than=self._clock() + 1)
            if loop and (self._loop_task is None or self._loop_task.done()):
                self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _warm_up(self) -> None:
        assert self._pipeline is not None
        started = time.perf_counter()
        kinds: dict[tuple[Any, ...], Node] = {}
        for node in self._nodes.values():
            kinds.setdefault((node.kind, node.model, node.api, node.tokenizer), node)
        pairs = [(node, task) for node in kinds.values() for task in self._node_tasks(node)]
        try:
            await self._pipeline.warm_up(pairs)
        except Exception:
            log.warning("manager.warm_up_failed", exc_info=True)
        self._warm_s = time.perf_counter() - started
        log.info("manager.warm pairs=%d seconds=%.1f", len(pairs), self._warm_s)

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
        """Tick every ``tick_s``, and sooner when finished docs free room to plan (so a
        node is not left idle until the next tick), but never more often than a few
        times the last tick's own duration (planning 100,000 pairs takes seconds)."""
        wake = self._wake = asyncio.Event()
        while True:
            started = time.perf_counter()
            wake.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("manager.tick_failed")
            spent = time.perf_counter() - started
            await asyncio.sleep(max(MIN_TICK_GAP_S, 4 * spent))
            try:
                await asyncio.wait_for(wake.wait(), max(0.0, self._cfg.tick_s - spent))
            except TimeoutError:
                pass

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
        key = (node.kind, tuple(node.tasks) if node.tasks is not None else None)
        tasks = self._leaf_tasks.get(key)
        if tasks is None:
            tasks = self._leaf_tasks[key] = self._resolve_tasks(node)
        return tasks

    def _resolve_tasks(self, node: Node) -> list[str]:
        # an lm-eval group or tag stands for its leaf tasks, each with a buffer of its own
        # (cluster/tasks/registry.py::leaf_task_names); its score is derived from theirs
        catalog = catalog_of(self._settings)
        configured = leaf_task_names(
            self._settings.diffusion_tasks if node.kind == "diffusion" else self._settings.tasks,
            catalog)
        if node.tasks is None:
            return configured
        return [t for t in leaf_task_names(node.tasks, catalog) if t in configured]

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
        for batch in self._batches(plan):
            for item in batch:
                self._state(item.node_id, item.task).reserved += item.count
            self._spawn(self._dispatch(batch))
        self._ticks += 1
        if plan or self._ticks == 1:  # a tick that planned nothing changed nothing to report
            self._progress.set()
        metrics.set_manager_queue(len(self._inflight_keys), planned=sum(i.count for i in plan))
        assert self._pipeline is not None
        self._checks.tick(now, self._nodes, self._pipeline, self._stores, self._spawn)
        if now - self._swept_at >= self._sweep_every_s:
            self._swept_at = now
            await self._sweep(older_than=now - self._cfg.redrive_after_s)
        if plan:
            log.info("manager.tick planned=%d docs=%d", len(plan), sum(i.count for i in plan))
        return len(plan)

    def _batches(self, plan: list[PlanItem]) -> list[list[PlanItem]]:
        """The plan cut into batches of about ``dispatch_batch_docs`` docs: each batch is one
        Sampler call, one Requester stream and a few Evaluator calls."""
        size = self._cfg.dispatch_batch_docs
        batches: list[list[PlanItem]] = []
        current: list[PlanItem] = []
        docs = 0
        for item in plan:
            if current and docs + item.count > size:
                batches.append(current)
                current, docs = [], 0
            current.append(item)
            docs += item.count
        if current:
            batches.append(current)
        return batches

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- dispatch --------------------------------------------------------------------
    def _request(self, item: PlanItem, node: Node, epoch: int) -> SampleRequest:
        state = self._state(item.node_id, item.task)
        if state.skip_epoch != epoch:
            state.skip, state.skip_epoch = set(), epoch
        exclude = state.in_flight | set(state.valid_doc_ids()) | state.skip
        return SampleRequest(node=node, task=item.task, count=item.count,
                             exclude_doc_ids=sorted(exclude), epoch=epoch, seed=self._cfg.seed)

    async def _dispatch(self, batch: list[PlanItem]) -> None:
        """Draw, relay and score one batch of plan items. A pair is never in two batches
        being drawn at once (planning skips pairs with ``reserved`` docs), so the docs
        excluded here are all the docs in flight."""
        assert self._pipeline is not None
        now = self._clock()
        epoch = int(now // self._cfg.sample_ttl_s)
        reqs = [self._request(item, self._nodes[item.node_id], epoch)
                for item in batch if item.node_id in self._nodes]
        try:
            draws, handoff = await self._pipeline.sample(reqs)
        except Exception:
            self._counters["pipeline_errors"] += 1
            log.exception("manager.sample_failed pairs=%d", len(reqs))
            return
        finally:
            for item in batch:
                self._state(item.node_id, item.task).reserved -= item.count
            self._progress.set()  # drawn (in flight now), or failed, or fewer than planned
        keys: list[str] = []
        nodes: dict[str, Node] = {}
        for draw in draws:
            state = self._state(draw.node_id, draw.task)
            if draw.error is not None:
                self._unmeasurable(draw, state)
                continue
            if state.unmeasurable is not None:
                self._spawn(self._record_unmeasurable(draw.node_id, draw.task, None, 0))
            state.unmeasurable, state.config_failures = None, 0
            state.in_flight.update(draw.doc_ids)
            state.at_node.update(draw.doc_ids)
            keys += [sample_key(draw.node_id, draw.task, d, draw.epoch) for d in draw.doc_ids]
            nodes[draw.node_id] = self._nodes[draw.node_id]
        if not keys:
            return
        self._inflight_keys.update(keys)
        self._counters["dispatched"] += len(keys)
        open_keys = set(keys)
        try:
            try:
                async for kind, payload in self._pipeline.relay_and_score(handoff, nodes):
                    if kind == RELAYED:
                        self._answered(payload)
                        continue
                    self._absorb(payload)
                    open_keys.difference_update(s.sample_key for s in payload)
            except Exception:
                self._counters["pipeline_errors"] += 1
                log.warning("manager.pipeline_failed docs=%d: re-driving from MongoDB",
                            len(open_keys), exc_info=True)
                if open_keys:
                    self._absorb(await self._redrive(sorted(open_keys)) or [])
        finally:
            self._release(keys)

    def _unmeasurable(self, draw: SampleDraw, state: PairState) -> None:
        """A pair whose adapter or dataset cannot be used as configured: say why, and
        try again only after a backoff (a fixed configuration fails the same way)."""
        state.unmeasurable = draw.error
        state.config_failures += 1
        self._progress.set()
        wait = backoff_s(state.config_failures, 1, self._cfg.backoff_base_s,
                         self._cfg.backoff_max_s)
        state.backoff_until = self._clock() + wait
        self._counters["unmeasurable"] += 1
        log.warning("manager.pair_unmeasurable node=%s task=%s retry_in_s=%.0f reason=%s",
                    draw.node_id, draw.task, wait, draw.error)
        self._spawn(self._record_unmeasurable(draw.node_id, draw.task, draw.error,
                                              state.config_failures))

    async def _record_unmeasurable(self, node_id: str, task: str, reason: str | None,
                                   attempts: int) -> None:
        """Keep the mark where other processes read it (`testbench scores`, the
        leaderboard): beside the pair's buffer (``BufferStore.mark_unmeasurable``); None
        clears it. A failed write is logged; the next attempt writes it again."""
        try:
            buffers = (await self._stores.mongo()).buffers
            if reason is None:
                await buffers.clear_unmeasurable(node_id, task)
            else:
                await buffers.mark_unmeasurable(node_id, task, reason, attempts, self._clock())
        except Exception:
            log.warning("manager.unmeasurable_not_recorded node=%s task=%s", node_id, task,
                        exc_info=True)

    def _answered(self, keys: list[str]) -> None:
        """These docs' relays are in: the node has room for more (their scoring follows)."""
        for key in keys:
            node_id, task, doc_id, _ = key.split("|")
            self._state(node_id, task).at_node.discard(int(doc_id))
        if keys:
            self._progress.set()
        if keys and self._wake is not None:
            self._wake.set()

    def _release(self, keys: list[str]) -> None:
        # docs left unscored (scored ones left ``_inflight_keys`` as they came in)
        changed = not self._inflight_keys.isdisjoint(keys)
        for key in keys:
            node_id, task, doc_id, _ = key.split("|")
            state = self._state(node_id, task)
            state.in_flight.discard(int(doc_id))
            state.at_node.discard(int(doc_id))
        self._inflight_keys.difference_update(keys)
        if changed:
            self._progress.set()

    async def _redrive(self, keys: list[str], attempts: int = 5) -> list[Sample] | None:
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
                nodes: dict[str, Node] = {}
                for node_id in {p.node_id for p in prompts}:
                    node = self._nodes.get(node_id) or await mongo.nodes.get(node_id)
                    if node is not None:
                        nodes[node_id] = node
                have = await mongo.relays.get_for_prompts([p.prompt_id for p in prompts])
                missing = [p for p in prompts if p.prompt_id not in have]
                relays = list(have.values())
                if missing:
                    relays += await self._pipeline.relay(missing, nodes)
                self._counters["redriven"] += len(keys)
                return await self._pipeline.score(relays, nodes)
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
        keys = [key for key, _, _ in pending if key not in self._inflight_keys]
        if keys:
            self._spawn(self._redrive_tracked(keys))
        metrics.set_manager_queue(len(self._inflight_keys), redriven=len(keys))

    async def _redrive_tracked(self, keys: list[str]) -> None:
        for key in keys:
            node_id, task, doc_id, _ = key.split("|")
            state = self._state(node_id, task)
            state.in_flight.add(int(doc_id))
            state.at_node.add(int(doc_id))
        self._inflight_keys.update(keys)
        try:
            self._absorb(await self._redrive(keys) or [])
        finally:
            self._release(keys)

    def _absorb(self, samples: list[Sample]) -> None:
        if samples:
            self._progress.set()
        if samples and self._wake is not None:
            self._wake.set()
        by_pair: dict[tuple[str, str], list[Sample]] = {}
        for sample in samples:
            by_pair.setdefault((sample.node_id, sample.task), []).append(sample)
        now = self._clock()
        for (node_id, task), pair_samples in by_pair.items():
            state = self._state(node_id, task)
            known = set(state.valid_doc_ids())
            for s in pair_samples:
                self._counters["samples"] += 1
                state.in_flight.discard(s.doc_id)
                state.at_node.discard(s.doc_id)
                self._inflight_keys.discard(s.sample_key)
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
                        state.backoff_until = now + wait

    # ---- status ----------------------------------------------------------------------
    def _blocked_by(self, node_id: str, task: str, tasks: Sequence[str], now: float
                    ) -> str | None:
        """Why a pair waits forever: a prerequisite task of the node (``task_dependencies``)
        that cannot be measured and is not full."""
        for dep in self._cfg.task_dependencies.get(task, ()):
            if dep not in tasks:
                continue
            dep_state = self._state(node_id, dep)
            full = dep_state.valid_count(now, self._cfg.sample_ttl_s) >= self._limits.target(dep)
            if dep_state.unmeasurable is not None and not full:
                return f"waits for {dep}, which cannot be measured: {dep_state.unmeasurable}"
        return None

    async def status(self, detail: bool = True, wait_s: float = 0.0) -> dict[str, Any]:
        """Progress: totals over every (node, task) (``valid`` counted up to each target,
        ``target``, ``in_flight``), and per pair when ``detail``. ``full`` when every buffer
        reached its target; ``settled`` when every pair is full or cannot be measured
        (``unmeasurable_pairs``, listed with their reasons either way: pairs that failed
        to be drawn as configured, and pairs waiting on such a prerequisite).

        ``wait_s`` > 0: first wait, at most that long, for progress since the previous
        waiting call (a long poll: a driver following the loop learns of each change as
        it happens, without asking several times a second)."""
        await self.ensure_started()
        if wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), wait_s)
            self._progress.clear()
        now = self._clock()
        pairs: list[dict[str, Any]] = []
        unmeasurable: list[dict[str, Any]] = []
        totals = {"valid": 0, "target": 0, "in_flight": 0}
        full = settled = bool(self._nodes)
        for nid, node in sorted(self._nodes.items()):
            tasks = self._node_tasks(node)
            for task in tasks:
                state = self._state(nid, task)
                valid = state.valid_count(now, self._cfg.sample_ttl_s)
                target = self._limits.target(task)
                totals["valid"] += min(valid, target)
                totals["target"] += target
                in_flight = len(state.in_flight) + state.reserved  # being drawn counts too
                totals["in_flight"] += in_flight
                reason = state.unmeasurable or self._blocked_by(nid, task, tasks, now)
                if reason is not None:
                    unmeasurable.append({"node_id": nid, "task": task, "reason": reason})
                full = full and valid >= target
                settled = settled and (valid >= target or reason is not None)
                if detail:
                    pairs.append({
                        "node_id": nid, "task": task, "valid": valid,
                        "in_flight": in_flight, "target": target,
                        "backoff_s": max(0.0, state.backoff_until - now),
                        "unmeasurable": reason,
                    })
        assert self._pipeline is not None
        return {"full": full, "settled": settled, "ticks": self._ticks, **totals,
                "pairs": pairs, "unmeasurable_pairs": unmeasurable, "warm_s": self._warm_s,
                "requests_built": await self._pipeline.build_stats(),
                "honesty": self._checks.status(detail), **self._counters}
