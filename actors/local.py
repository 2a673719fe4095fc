"""The Manager's children as plain in-process objects (no Ray).

Same classes as the Ray pipeline, called directly: unit tests, and in-process runs
where a cluster would be overkill.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from actors.evaluator import Evaluator
from actors.manager import RELAYED, SCORED
from actors.requester import loop_requester
from actors.sampler import Sampler
from cluster.core.schemas import Node, Prompt, Relay, Sample, SampleDraw, SampleRequest
from cluster.core.settings import Settings
from cluster.core.streaming import StreamingJob
from cluster.honesty.traffic import PendingCounts, measuring_counts, record_measuring
from cluster.storage.connections import StoreConnections

if TYPE_CHECKING:
    from actors.auditor import Auditor

log = logging.getLogger(__name__)


class MongoRelaySink:
    """Records relays (first write wins) and adds the newly recorded ones, given their
    prompts, to their nodes' measuring-traffic counters (``cluster/honesty/traffic.py``),
    what the Manager weighs verification against.

    The counters are written every ``flush_s`` (``honesty.traffic_flush_s``), all nodes in
    one bulk write, by a timer started with the first pending count; ``flush_s`` 0 writes
    them with every batch. At a thousand nodes a per-batch write was one upsert per relay,
    as costly to the store as the relays. They are accounting, rebuilt exactly from prompts
    and relays by ``traffic_report``: counts pending when the process dies are not
    re-added (the verification budget then errs on the strict side)."""

    def __init__(self, stores: StoreConnections, flush_s: float = 0.0) -> None:
        self._stores = stores
        self._flush_s = flush_s
        self._pending = PendingCounts()
        self._flusher: asyncio.Task[None] | None = None

    async def record_relays(self, relays: list[Relay],
                            prompts: Mapping[str, Prompt] | None = None) -> None:
        mongo = await self._stores.mongo()
        inserted = await mongo.relays.record_relays(relays)
        if not (prompts and inserted):
            return
        self._pending.add(measuring_counts(inserted, prompts))
        if self._flush_s <= 0:
            await self.flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_s)
        await self.flush()

    async def flush(self) -> None:
        """Write the pending counts now."""
        counts = self._pending.take()
        if not counts:
            return
        try:
            await record_measuring(await self._stores.mongo(), counts, time.time())
        except Exception:  # accounting only: the relays themselves are recorded
            log.warning("relays.traffic_not_counted nodes=%d", len(counts), exc_info=True)


class LocalPipeline:
    def __init__(self, settings: Settings) -> None:
        self.stores = StoreConnections(settings)
        # All in this process: one of each unless more are asked for (0 means "in here").
        self.samplers = [Sampler(settings, self.stores)
                         for _ in range(max(1, settings.pools.samplers))]
        self.evaluators = [Evaluator(settings, self.stores)
                           for _ in range(max(1, settings.pools.evaluators))]
        # Relays are recorded here with their prompts (traffic counters), as on Ray.
        self.requester = loop_requester(settings.requester)
        self.sink = MongoRelaySink(self.stores, settings.honesty.traffic_flush_s)
        self._settings = settings
        self.auditor: Auditor | None = None  # created on first use, as on Ray
        self._next_sampler = itertools.cycle(self.samplers)
        self._next_evaluator = itertools.cycle(self.evaluators)

    async def sample(self, reqs: Sequence[SampleRequest]) -> tuple[list[SampleDraw], Any]:
        draws, prompts, docs = await next(self._next_sampler).sample_batch(reqs)
        return draws, (prompts, docs)

    async def relay_and_score(
        self, handoff: Any, nodes: Mapping[str, Node]
    ) -> AsyncIterator[tuple[str, Any]]:
        prompts, docs = handoff
        relays = await self.relay(prompts, nodes)
        yield RELAYED, sorted({r.sample_key for r in relays})
        yield SCORED, await next(self._next_evaluator).score(relays, nodes, docs)

    async def relay(self, prompts: list[Prompt], nodes: Mapping[str, Node]) -> list[Relay]:
        relays = await self.requester.relay(prompts, dict(nodes))
        await self.sink.record_relays(relays, {p.prompt_id: p for p in prompts})
        return relays

    async def score(self, relays: list[Relay], nodes: Mapping[str, Node]) -> list[Sample]:
        return await next(self._next_evaluator).score(relays, nodes)

    async def warm_up(self, pairs: Sequence[tuple[Node, str]]) -> None:
        for child in [*self.samplers, *self.evaluators]:
            child.warm_up(pairs)

    async def build_stats(self) -> dict[str, float]:
        # one process: its Samplers share the process-wide counts
        return self.samplers[0].build_stats()

    def _auditor(self) -> Auditor:
        if self.auditor is None:
            from actors.auditor import Auditor  # the honesty stack: only once it is needed

            self.auditor = Auditor(self._settings, self.stores)
        return self.auditor

    async def verify(self, nodes: Sequence[Node]) -> dict[str, Any]:
        return await self._auditor().verify(nodes)

    async def audit(self, jobs: Sequence[StreamingJob]) -> dict[str, Any]:
        return await self._auditor().audit(jobs)

    async def reference_docs(self) -> dict[str, Any]:
        return await self._auditor().reference_docs()

    async def check_traffic(self, nodes: Sequence[Node]) -> dict[str, Any]:
        return await self._auditor().check_traffic(nodes)

    async def close(self) -> None:
        if self.auditor is not None:
            await self.auditor.close()
        await self.requester.close()
        await self.stores.close()
