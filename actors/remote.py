"""The one place where ``ray.remote`` is applied, and the Ray-backed Pipeline.

Children restart on failure and their in-flight calls are retried after the restart
(``max_task_retries=-1``); every step is idempotent in MongoDB, so a retry never
duplicates a relay or a sample. The Manager is a named, detached actor in the
``testbench`` namespace, so it outlives the driver that started it and the dashboard
shows it; when it restarts it rebuilds from MongoDB and re-creates its children.
"""

from __future__ import annotations

import itertools
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.evaluator import Evaluator
from actors.local import MongoRelaySink
from actors.manager import Manager
from actors.requester import loop_requester
from actors.sampler import Sampler
from cluster.core.schemas import Node, Prompt, Relay, SampleRequest, ScoreSamples
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections

MANAGER_NAME = "manager"

_CHILD = {"max_restarts": -1, "max_task_retries": -1, "num_cpus": 0}

SamplerActor = ray.remote(**_CHILD)(Sampler)
EvaluatorActor = ray.remote(**_CHILD)(Evaluator)


class RequesterHost:
    """The Requester with its MongoDB sink, as one async actor."""

    def __init__(self, settings: Settings) -> None:
        self._requester = loop_requester(settings.requester, MongoRelaySink(StoreConnections(settings)))

    async def relay(self, prompts: list[Prompt], nodes: dict[str, Node]) -> list[Relay]:
        return await self._requester.relay(prompts, nodes)

    def stats(self) -> dict[str, Any]:
        return self._requester.stats()


RequesterActor = ray.remote(**_CHILD, max_concurrency=10_000)(RequesterHost)


def _child_placement(settings: Settings) -> dict[str, Any]:
    """Children on the Manager's node, unless ``ray.colocate_children`` is off.

    A prompt batch goes sampler -> requester -> evaluator as object refs; on one node
    those hand-offs are shared-memory reads, not object transfers. Hard affinity: Ray's
    soft affinity still spills some children to other nodes (measured on a two-node
    ``Cluster``), and hard is safe here, because children share their owner's fate: if
    the Manager's node dies, they die with the Manager, and the restarted Manager
    creates new ones beside itself. Children take no CPU, so they never wait for room.
    """
    if not settings.ray.colocate_children:
        return {}
    node_id = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


class RayPipeline:
    """The Manager's children as Ray actors; work moves as object refs."""

    def __init__(self, settings: Settings) -> None:
        pools = settings.pools
        placement = _child_placement(settings)
        self.samplers = [SamplerActor.options(**placement).remote(settings)
                         for _ in range(pools.samplers)]
        self.evaluators = [EvaluatorActor.options(**placement).remote(settings)
                           for _ in range(pools.evaluators)]
        self.requester = RequesterActor.options(**placement).remote(settings)
        self._next_sampler = itertools.cycle(self.samplers)
        self._next_evaluator = itertools.cycle(self.evaluators)

    async def sample(self, req: SampleRequest) -> tuple[list[int], Any]:
        sampler = next(self._next_sampler)
        ids_ref, prompts_ref = sampler.sample.options(num_returns=2).remote(req)
        return await ids_ref, prompts_ref

    async def relay_and_score(self, prompts: Any, node: Node) -> ScoreSamples:
        relays_ref = self.requester.relay.remote(prompts, {node.node_id: node})
        return await next(self._next_evaluator).score.remote(relays_ref, node)

    async def relay(self, prompts: list[Prompt], node: Node) -> list[Relay]:
        return await self.requester.relay.remote(prompts, {node.node_id: node})

    async def score(self, relays: list[Relay], node: Node) -> ScoreSamples:
        return await next(self._next_evaluator).score.remote(relays, node)

    def children(self) -> dict[str, Any]:
        return {"samplers": self.samplers, "evaluators": self.evaluators,
                "requester": self.requester}

    async def close(self) -> None:
        for actor in [*self.samplers, *self.evaluators, self.requester]:
            ray.kill(actor, no_restart=True)


class ManagerService(Manager):
    """The Manager with Ray children; adds access to them for operators and tests."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, pipeline_factory=RayPipeline)

    async def children(self) -> dict[str, Any]:
        await self.ensure_started()
        assert isinstance(self._pipeline, RayPipeline)
        return self._pipeline.children()


ManagerActor = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(ManagerService)


def get_or_create_manager(settings: Settings) -> Any:
    """The detached Manager of namespace ``settings.ray.namespace``."""
    return ManagerActor.options(
        name=MANAGER_NAME,
        namespace=settings.ray.namespace,
        lifetime="detached",
        get_if_exists=True,
    ).remote(settings)
