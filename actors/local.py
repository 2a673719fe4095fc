"""The Manager's children as plain in-process objects (no Ray).

Same classes as the Ray pipeline, called directly: unit tests, and in-process runs
where a cluster would be overkill.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from actors.evaluator import Evaluator
from actors.requester import loop_requester
from actors.sampler import Sampler
from cluster.core.schemas import Node, Prompt, Relay, Sample, SampleDraw, SampleRequest
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections


class MongoRelaySink:
    def __init__(self, stores: StoreConnections) -> None:
        self._stores = stores

    async def record_relays(self, relays: list[Relay]) -> None:
        mongo = await self._stores.mongo()
        await mongo.relays.record_relays(relays)


class LocalPipeline:
    def __init__(self, settings: Settings) -> None:
        self.stores = StoreConnections(settings)
        self.samplers = [Sampler(settings, self.stores) for _ in range(settings.pools.samplers)]
        self.evaluators = [Evaluator(settings, self.stores)
                           for _ in range(settings.pools.evaluators)]
        self.requester = loop_requester(settings.requester, MongoRelaySink(self.stores))
        self._next_sampler = itertools.cycle(self.samplers)
        self._next_evaluator = itertools.cycle(self.evaluators)

    async def sample(self, reqs: Sequence[SampleRequest]) -> tuple[list[SampleDraw], Any]:
        draws, prompts, docs = await next(self._next_sampler).sample_batch(reqs)
        return draws, (prompts, docs)

    async def relay_and_score(
        self, handoff: Any, nodes: Mapping[str, Node]
    ) -> AsyncIterator[list[Sample]]:
        prompts, docs = handoff
        relays = await self.relay(prompts, nodes)
        yield await next(self._next_evaluator).score(relays, nodes, docs)

    async def relay(self, prompts: list[Prompt], nodes: Mapping[str, Node]) -> list[Relay]:
        return await self.requester.relay(prompts, dict(nodes))

    async def score(self, relays: list[Relay], nodes: Mapping[str, Node]) -> list[Sample]:
        return await next(self._next_evaluator).score(relays, nodes)

    async def warm_up(self, pairs: Sequence[tuple[Node, str]]) -> None:
        for child in [*self.samplers, *self.evaluators]:
            child.warm_up(pairs)

    async def close(self) -> None:
        await self.requester.close()
        await self.stores.close()
