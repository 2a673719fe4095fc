"""The Manager's children as plain in-process objects (no Ray).

Same classes as the Ray pipeline, called directly: unit tests, and in-process runs
where a cluster would be overkill.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from actors.auditor import Auditor
from actors.evaluator import Evaluator
from actors.manager import RELAYED, SCORED
from actors.requester import loop_requester
from actors.sampler import Sampler
from cluster.core.schemas import Node, Prompt, Relay, Sample, SampleDraw, SampleRequest
from cluster.core.settings import Settings
from cluster.core.streaming import StreamingJob
from cluster.honesty.traffic import record_measuring
from cluster.storage.connections import StoreConnections

log = logging.getLogger(__name__)


class MongoRelaySink:
    """Records relays (first write wins) and, given their prompts, adds the newly recorded
    ones to their nodes' measuring-traffic counters (``cluster/honesty/traffic.py``), what
    the Manager weighs verification against."""

    def __init__(self, stores: StoreConnections) -> None:
        self._stores = stores

    async def record_relays(self, relays: list[Relay],
                            prompts: Mapping[str, Prompt] | None = None) -> None:
        mongo = await self._stores.mongo()
        inserted = await mongo.relays.record_relays(relays)
        if prompts and inserted:
            try:
                await record_measuring(mongo, inserted, prompts, time.time())
            except Exception:  # accounting only: the relays themselves are recorded
                log.warning("relays.traffic_not_counted n=%d", len(inserted), exc_info=True)


class LocalPipeline:
    def __init__(self, settings: Settings) -> None:
        self.stores = StoreConnections(settings)
        self.samplers = [Sampler(settings, self.stores) for _ in range(settings.pools.samplers)]
        self.evaluators = [Evaluator(settings, self.stores)
                           for _ in range(settings.pools.evaluators)]
        # Relays are recorded here with their prompts (traffic counters), as on Ray.
        self.requester = loop_requester(settings.requester)
        self.sink = MongoRelaySink(self.stores)
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

    def _auditor(self) -> Auditor:
        if self.auditor is None:
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
