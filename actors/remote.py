"""The one place where ``ray.remote`` is applied, and the Ray-backed Pipeline.

Children restart on failure and their in-flight calls are retried after the restart
(``max_task_retries=-1``); every step is idempotent in MongoDB, so a retry never
duplicates a relay or a sample. The Manager is a named, detached actor in the
``testbench`` namespace, so it outlives the driver that started it and the dashboard
shows it; when it restarts it rebuilds from MongoDB and re-creates its children.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.cpu_policy import apply_cpu_policy
from actors.evaluator import Evaluator
from actors.local import MongoRelaySink
from actors.manager import RELAYED, SCORED, Manager
from actors.requester import loop_requester
from actors.sampler import Sampler
from cluster.core.schemas import Node, Prompt, Relay, Sample, SampleDraw, SampleRequest
from cluster.core.settings import Settings
from cluster.core.streaming import StreamingJob
from cluster.storage.connections import StoreConnections

MANAGER_NAME = "manager"

_CHILD = {"max_restarts": -1, "max_task_retries": -1, "num_cpus": 0}


class LoopProcess:
    """First in the bases of every loop actor: its process takes ``ray.loop_cpu_policy``
    before anything else runs in it (``actors/cpu_policy.py``)."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        apply_cpu_policy(settings.ray.loop_cpu_policy)
        super().__init__(settings, *args, **kwargs)


class SamplerProcess(Sampler):
    """The Sampler takes ``ray.loop_cpu_policy`` once its first batch is drawn: its warm-up
    (lm-eval's imports, the task, the tokenizer) and first draw are what the first request
    waits for, while no node has anything to do; at ``SCHED_IDLE`` they lost the CPU to
    every other process starting up (warm-up 6.0 s in the e2e bench against ~3 s)."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(settings, *args, **kwargs)
        self._cpu_policy: str | None = settings.ray.loop_cpu_policy

    async def sample_batch(self, reqs: Sequence[SampleRequest]) -> Any:
        try:
            return await super().sample_batch(reqs)
        finally:
            if self._cpu_policy is not None:
                apply_cpu_policy(self._cpu_policy)
                self._cpu_policy = None


class EvaluatorProcess(LoopProcess, Evaluator):
    pass


SamplerActor = ray.remote(**_CHILD)(SamplerProcess)
EvaluatorActor = ray.remote(**_CHILD)(EvaluatorProcess)


@functools.cache
def auditor_actor() -> Any:
    """The Auditor's actor class, made on first use: the honesty stack it imports takes
    ~0.5-0.9 s, which every loop process (and every ``testbench`` command) paid at start-up
    when it was imported with this module, on the way to the first request. Defined here,
    not at module level, so it travels to its worker by value (its bases by reference)."""
    from actors.auditor import Auditor

    process = type("AuditorProcess", (LoopProcess, Auditor), {"__module__": __name__})
    return ray.remote(**_CHILD)(process)


class RequesterHost:
    """The Requester with its MongoDB sink, as one async actor."""

    def __init__(self, settings: Settings) -> None:
        apply_cpu_policy(settings.ray.requester_cpu_policy)
        # Relays are recorded here, batch by batch, not by the Requester call by call.
        self._requester = loop_requester(settings.requester)
        self._sink = MongoRelaySink(StoreConnections(settings), settings.honesty.traffic_flush_s)
        self._wait_s = settings.manager.score_batch_wait_s
        self._batch_relays = settings.manager.dispatch_batch_docs

    async def relay(self, prompts: list[Prompt], nodes: Mapping[str, Node]) -> list[Relay]:
        relays = await self._requester.relay(prompts, dict(nodes))
        await self._sink.record_relays(relays, {p.prompt_id: p for p in prompts})
        return relays

    async def relay_stream(
        self, prompts: list[Prompt], nodes: Mapping[str, Node]
    ) -> AsyncIterator[list[str] | list[Relay]]:
        """The prompts' relays in batches as their docs finish (a doc's prompts are relayed
        together, so a batch holds whole docs): a slow node holds back only its own docs,
        and a node's finished docs are scored while its others are still in flight, so
        the Manager can send it more. Each batch is recorded before it is yielded; a batch
        gathers for at most ``manager.score_batch_wait_s``. Each batch is yielded as two
        items: its sample keys (small: the Manager reads them), then its relays (passed on
        to an Evaluator by reference, never fetched by the Manager)."""
        by_doc: dict[str, list[Prompt]] = {}
        for prompt in prompts:
            by_doc.setdefault(prompt.sample_key, []).append(prompt)
        finished: asyncio.Queue[list[Relay] | BaseException] = asyncio.Queue()
        node_map = dict(nodes)
        by_id = {p.prompt_id: p for p in prompts}

        async def relay_doc(doc_prompts: list[Prompt]) -> None:
            try:
                finished.put_nowait(await self._requester.relay(doc_prompts, node_map))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer below
                finished.put_nowait(exc)
                raise

        tasks = [asyncio.create_task(relay_doc(ps)) for ps in by_doc.values()]
        left = len(tasks)
        loop = asyncio.get_running_loop()

        def take(item: list[Relay] | BaseException, batch: list[Relay]) -> None:
            if isinstance(item, BaseException):
                raise item
            batch.extend(item)

        try:
            while left:
                batch: list[Relay] = []
                take(await finished.get(), batch)
                left -= 1
                deadline = loop.time() + self._wait_s
                while left and len(batch) < self._batch_relays:
                    try:
                        item = await asyncio.wait_for(finished.get(), deadline - loop.time())
                    except TimeoutError:
                        break
                    left -= 1
                    take(item, batch)
                await self._sink.record_relays(batch, by_id)
                yield sorted({r.sample_key for r in batch})
                yield batch
        finally:
            for task in tasks:
                task.cancel()

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
    """The Manager's children as Ray actors; work moves as object refs.

    With ``pools.samplers`` or ``pools.evaluators`` at 0 (the default) that stage runs
    here, in the Manager's own process, on the ``stores`` it passes: a process fewer, each
    costing ~0.01 core when idle, and no hand-off between processes for it. The Requester
    always has its own process: its clock measures the nodes, and it keeps the
    ``ray.requester_cpu_policy`` while the loop's other work yields the CPU."""

    def __init__(self, settings: Settings, stores: StoreConnections | None = None) -> None:
        pools = settings.pools
        placement = _child_placement(settings)
        here_too = stores is None and not (pools.samplers and pools.evaluators)
        self._owned_stores = StoreConnections(settings) if here_too else None
        here = stores or self._owned_stores
        self.samplers = [SamplerActor.options(**placement).remote(settings)
                         for _ in range(pools.samplers)]
        # Here, the Sampler moves this process to ``ray.loop_cpu_policy`` after its first
        # batch, as it does its own (ManagerService leaves the process at "normal" so far).
        self._own_sampler = None if pools.samplers else SamplerProcess(settings, here)
        self._own_evaluator = None if pools.evaluators else Evaluator(settings, here)
        self.requester = RequesterActor.options(**placement).remote(settings)
        # Evaluators are created once the Samplers are warm (or on first use): the first
        # batch waits for a Sampler and the Requester, and on a small machine the
        # Evaluators' process start would take the cores those need; the first answers
        # need an Evaluator only seconds later. The Auditor is created on first use: a
        # loop with no honesty step to run never starts it.
        self._evaluators: list[Any] | None = None
        self.auditor: Any | None = None
        self._settings, self._placement = settings, placement
        self._next_sampler = itertools.cycle(self.samplers)
        self._evaluator_turn = itertools.count()

    @property
    def evaluators(self) -> list[Any]:
        if self._evaluators is None:
            self._evaluators = [EvaluatorActor.options(**self._placement).remote(self._settings)
                                for _ in range(self._settings.pools.evaluators)]
        return self._evaluators

    def _evaluator(self) -> Any:
        evaluators = self.evaluators
        return evaluators[next(self._evaluator_turn) % len(evaluators)]

    async def sample(self, reqs: Sequence[SampleRequest]) -> tuple[list[SampleDraw], Any]:
        """The draws, and the hand-off to ``relay_and_score``: the prompts and the docs
        read for them, as values when drawn here, as object refs when drawn by an actor."""
        if self._own_sampler is not None:
            draws, prompts, docs = await self._own_sampler.sample_batch(list(reqs))
            return draws, (prompts, docs)
        sampler = next(self._next_sampler)
        draws_ref, prompts_ref, docs_ref = sampler.sample_batch.options(num_returns=3).remote(
            list(reqs))
        return await draws_ref, (prompts_ref, docs_ref)

    async def relay_and_score(
        self, handoff: Any, nodes: Mapping[str, Node]
    ) -> AsyncIterator[tuple[str, Any]]:
        """Answered and scored docs as the Requester's stream goes: each batch's keys as
        soon as it is recorded, and its relays to the next Evaluator while the stream
        goes on."""
        prompts, docs = handoff
        nodes_ref = ray.put(dict(nodes))
        stream = self.requester.relay_stream.options(num_returns="streaming").remote(
            prompts, nodes_ref)
        # The docs once per dispatch, where the scoring is: read here, or put for actors.
        if self._own_evaluator is not None and isinstance(docs, ray.ObjectRef):
            docs = await docs
        elif self._own_evaluator is None and not isinstance(docs, ray.ObjectRef):
            docs = ray.put(docs)
        scoring: set[asyncio.Future[list[Sample]]] = set()
        keys_next = True
        async for ref in stream:
            if keys_next:
                keys_next = False
                yield RELAYED, await ref
                continue
            keys_next = True
            if self._own_evaluator is not None:
                scoring.add(asyncio.ensure_future(self._score_here(ref, nodes, docs)))
            else:
                scoring.add(asyncio.ensure_future(
                    self._evaluator().score.remote(ref, nodes_ref, docs)))
            for future in [f for f in scoring if f.done()]:
                scoring.discard(future)
                yield SCORED, future.result()
        while scoring:
            done, scoring = await asyncio.wait(scoring, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                yield SCORED, future.result()

    async def _score_here(self, relays_ref: Any, nodes: Mapping[str, Node],
                          docs: Any) -> list[Sample]:
        assert self._own_evaluator is not None
        return await self._own_evaluator.score(await relays_ref, nodes, docs)

    async def relay(self, prompts: list[Prompt], nodes: Mapping[str, Node]) -> list[Relay]:
        return await self.requester.relay.remote(prompts, dict(nodes))

    async def score(self, relays: list[Relay], nodes: Mapping[str, Node]) -> list[Sample]:
        if self._own_evaluator is not None:
            return await self._own_evaluator.score(relays, dict(nodes))
        return await self._evaluator().score.remote(relays, dict(nodes))

    async def warm_up(self, pairs: Sequence[tuple[Node, str]]) -> None:
        # Samplers first: the first batch waits for them, and on a small machine the
        # Evaluators' start and warm-up would compete for the same cores; a doc's scoring
        # waits only for its relays, and the node stays busy meanwhile (planning counts
        # the docs at the node, not the ones being scored). Here, warming is the same
        # per-process adapter cache for both (lm-eval's task, the tokenizer).
        if self._own_sampler is not None:
            self._own_sampler.warm_up(list(pairs))
        await asyncio.gather(*(s.warm_up.remote(list(pairs)) for s in self.samplers))
        if self._own_evaluator is not None:
            self._own_evaluator.warm_up(list(pairs))
        await asyncio.gather(*(e.warm_up.remote(list(pairs)) for e in self.evaluators))

    async def build_stats(self) -> dict[str, float]:
        """Docs the Samplers built requests for and the CPU seconds that took, summed over
        their processes (a Sampler restarting is left out rather than waited for: this is
        part of every status call)."""
        if self._own_sampler is not None:
            return self._own_sampler.build_stats()
        total = {"docs": 0, "cpu_s": 0.0}
        if not self.samplers:
            return total
        done, pending = await asyncio.wait(
            [asyncio.ensure_future(s.build_stats.remote()) for s in self.samplers], timeout=2.0)
        for future in pending:  # not left to fail unobserved once the Sampler is back
            future.cancel()
        for future in done:
            if future.exception() is None:
                for key, value in future.result().items():
                    total[key] = total.get(key, 0) + value
        return total

    def _auditor(self) -> Any:
        if self.auditor is None:
            self.auditor = auditor_actor().options(**self._placement).remote(self._settings)
        return self.auditor

    async def verify(self, nodes: Sequence[Node]) -> dict[str, Any]:
        return await self._auditor().verify.remote(list(nodes))

    async def audit(self, jobs: Sequence[StreamingJob]) -> dict[str, Any]:
        return await self._auditor().audit.remote(list(jobs))

    async def reference_docs(self) -> dict[str, Any]:
        return await self._auditor().reference_docs.remote()

    async def check_traffic(self, nodes: Sequence[Node]) -> dict[str, Any]:
        return await self._auditor().check_traffic.remote(list(nodes))

    def children(self) -> dict[str, Any]:
        out = {"samplers": self.samplers, "evaluators": self.evaluators,
               "requester": self.requester}
        return {**out, "auditor": self.auditor} if self.auditor is not None else out

    async def close(self) -> None:
        extra = [self.auditor] if self.auditor is not None else []
        for actor in [*self.samplers, *(self._evaluators or []), self.requester, *extra]:
            ray.kill(actor, no_restart=True)
        if self._owned_stores is not None:
            await self._owned_stores.close()


class ManagerService(Manager):
    """The Manager with Ray children; adds access to them for operators and tests."""

    def __init__(self, settings: Settings) -> None:
        # With the Sampler in this process, it moves the process once it drew its first
        # batch (SamplerProcess): its warm-up and first draw are what the first request
        # waits for.
        if settings.pools.samplers:
            apply_cpu_policy(settings.ray.loop_cpu_policy)
        super().__init__(settings,
                         pipeline_factory=lambda s: RayPipeline(s, self._stores))

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
