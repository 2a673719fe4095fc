"""Sampler: draws docs for many (node, task) pairs from PostgreSQL and builds their requests.

Docs are drawn with a RNG seeded by the request (node, task, epoch, exclusions), so a
replayed request draws the same docs. A batch of requests costs one PostgreSQL read per
task and one MongoDB write: prompts are written before they are returned, and from then on
nothing about them can be lost. The docs travel on with the prompts (to the Evaluator), so
they are read once, and so does what building their requests computed (lm-eval Instances,
token ids: :class:`DrawnDocs`), so they are rendered and tokenized once.

A pair that cannot be measured as configured (its adapter cannot be built: a tokenizer
that does not load, a chat node on a loglikelihood task; its dataset is not loaded) gets a
:class:`SampleDraw` with the reason instead of failing the batch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.core.errors import DatasetError, TaskError
from cluster.core.schemas import Node, Prompt, SampleDraw, SampleRequest, sample_key
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections
from cluster.tasks.registry import catalog_of, load_adapter, request_build_stats, warm_adapters

log = logging.getLogger(__name__)

# (task, doc_id) -> the doc: what the Evaluator needs to score the doc's relays
Docs = dict[tuple[str, int], dict[str, Any]]


@dataclass
class DrawnDocs:
    """A batch's docs as they travel on to the Evaluator, with what building their
    requests computed per (node, task, doc) (the adapter's ``DocRequests``: Instances and
    token ids), so that scoring a doc does not render and tokenize it a second time."""

    docs: Docs
    requests: dict[tuple[str, str, int], Any] = field(default_factory=dict)


def draw_doc_ids(
    all_ids: list[int], exclude: set[int], count: int, rng: random.Random
) -> list[int]:
    candidates = [i for i in all_ids if i not in exclude] if exclude else all_ids
    if count >= len(candidates):
        return list(candidates)
    return sorted(rng.sample(candidates, count))


class Sampler:
    def __init__(
        self,
        settings: Settings,
        stores: StoreConnections | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._stores = stores or StoreConnections(settings)
        self._clock = clock
        self._doc_ids: dict[tuple[str, str], list[int]] = {}
        # One batch at a time, in the order they came: building prompts is CPU work
        # between two awaits (the docs' read, the prompts' write). Batches let in together
        # would each build while the others wait on their store round trips, and every
        # batch would go on to the Requester only once the last had been built.
        self._turn = asyncio.Lock()

    def adapter(self, node: Node, task: str) -> Any:
        return load_adapter(task, catalog_of(self._settings), node)

    def warm_up(self, pairs: Sequence[tuple[Node, str]]) -> int:
        return warm_adapters(pairs, catalog_of(self._settings))

    def build_stats(self) -> dict[str, float]:
        """Docs whose requests this Sampler's process built, and the CPU seconds that took
        (``cluster.tasks.lmeval.request_build_stats``): docs a body cache already held cost
        nothing."""
        return request_build_stats()

    async def _all_doc_ids(self, task: str, split: str) -> list[int]:
        key = (task, split)
        ids = self._doc_ids.get(key)
        if ids is None:
            datasets = await self._stores.datasets()
            ids = await datasets.doc_ids(task, split)
            if not ids:
                raise DatasetError(
                    f"task {task!r} has no docs in split {split!r}: run `testbench datasets load`"
                )
            self._doc_ids[key] = ids
        return ids

    async def sample(self, req: SampleRequest) -> tuple[list[int], list[Prompt]]:
        """One request (tests, tools): its doc ids and prompts; a pair that cannot be
        measured raises its reason."""
        draws, prompts, _ = await self.sample_batch([req])
        if draws[0].error is not None:
            raise TaskError(draws[0].error)
        return draws[0].doc_ids, prompts

    async def sample_batch(
        self, reqs: Sequence[SampleRequest]
    ) -> tuple[list[SampleDraw], list[Prompt], DrawnDocs]:
        """Draw docs for every request, build their prompts and store them."""
        async with self._turn:
            return await self._sample_batch(reqs)

    async def _sample_batch(
        self, reqs: Sequence[SampleRequest]
    ) -> tuple[list[SampleDraw], list[Prompt], DrawnDocs]:
        draws: list[SampleDraw] = []
        chosen: list[tuple[SampleRequest, Any, list[int]]] = []
        wanted: dict[tuple[str, str], set[int]] = {}
        for req in reqs:
            draw = SampleDraw(node_id=req.node.node_id, task=req.task, epoch=req.epoch)
            draws.append(draw)
            try:
                adapter = self.adapter(req.node, req.task)
                all_ids = await self._all_doc_ids(req.task, adapter.eval_split)
            except (TaskError, DatasetError) as exc:
                draw.error = str(exc)
                continue
            exclude = set(req.exclude_doc_ids)
            rng = random.Random(
                f"{req.seed}|{req.node.node_id}|{req.task}|{req.epoch}|{len(exclude)}|{sum(exclude)}"
            )
            draw.doc_ids = draw_doc_ids(all_ids, exclude, req.count, rng)
            if draw.doc_ids:
                chosen.append((req, adapter, draw.doc_ids))
                wanted.setdefault((req.task, adapter.eval_split), set()).update(draw.doc_ids)
        if not chosen:
            return draws, [], DrawnDocs({})
        datasets = await self._stores.datasets()
        docs: Docs = {}
        for (task, split), ids in wanted.items():
            for doc_id, doc in (await datasets.fetch_docs(task, split, sorted(ids))).items():
                docs[(task, doc_id)] = doc
        now = self._clock()
        prompts: list[Prompt] = []
        drawn = DrawnDocs(docs)
        for draw, (req, adapter, doc_ids) in zip(
                (d for d in draws if d.doc_ids), chosen, strict=True):
            built: list[Prompt] = []
            handed: dict[tuple[str, str, int], Any] = {}
            export = getattr(adapter, "doc_requests", None)
            try:
                for doc_id in doc_ids:
                    doc = docs[(req.task, doc_id)]
                    key = sample_key(req.node.node_id, req.task, doc_id, req.epoch)
                    built += adapter.build_prompts(req.node, doc_id, doc, key, now)
                    if export is not None:
                        handed[(req.node.node_id, req.task, doc_id)] = export(doc_id, doc)
            except TaskError as exc:  # e.g. a doc the task's templates cannot render
                draw.error, draw.doc_ids = str(exc), []
                continue
            prompts += built
            drawn.requests.update((k, v) for k, v in handed.items() if v is not None)
        mongo = await self._stores.mongo()
        await mongo.prompts.insert_many(prompts)
        log.debug("sampler.sampled pairs=%d docs=%d prompts=%d",
                  len(chosen), sum(len(d) for _, _, d in chosen), len(prompts))
        return draws, prompts, drawn
