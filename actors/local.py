"""The Manager's children as plain in-process objects (no Ray).

Same classes as the Ray pipeline, called directly: unit tests, and in-process runs
where a cluster would be overkill.
"""

from __future__ import annotations

import itertools
from typing import Any

from actors.evaluator import Evaluator
from actors.requester import loop_requester
from actors.sampler import Sampler
from cluster.core.schemas import Node, Prompt, Relay, SampleRequest, ScoreSamples
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

    async def sample(self, req: SampleRequest) -> tuple[list[int], Any]:
        return await next(self._next_sampler).sample(req)

    async def relay_and_score(self, prompts: Any, node: Node) -> ScoreSamples:
        return await self.score(await self.relay(prompts, node), node)

    async def relay(self, prompts: list[Prompt], node: Node) -> list[Relay]:
        return await self.requester.relay(prompts, {node.node_id: node})

    async def score(self, relays: list[Relay], node: Node) -> ScoreSamples:
        return await next(self._next_evaluator).score(relays, node)

    async def close(self) -> None:
        await self.requester.close()
        await self.stores.close()
