"""Sampler: draws docs for (node, task) from PostgreSQL and builds the node's requests.

Docs are drawn with a RNG seeded by the request (node, task, epoch, exclusions), so a
replayed request draws the same docs. Prompts are written to MongoDB before they are
returned: from then on nothing about them can be lost.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from cluster.core.errors import DatasetError
from cluster.core.schemas import Node, Prompt, SampleRequest, sample_key
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections
from cluster.tasks.lmeval import TaskAdapter
from cluster.tasks.registry import load_adapter

log = logging.getLogger(__name__)


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

    def adapter(self, node: Node, task: str) -> TaskAdapter:
        return load_adapter(task, self._settings.datasets_dir, node)

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
        adapter = self.adapter(req.node, req.task)
        all_ids = await self._all_doc_ids(req.task, adapter.eval_split)
        exclude = set(req.exclude_doc_ids)
        rng = random.Random(
            f"{req.seed}|{req.node.node_id}|{req.task}|{req.epoch}|{len(exclude)}|{sum(exclude)}"
        )
        doc_ids = draw_doc_ids(all_ids, exclude, req.count, rng)
        if not doc_ids:
            return [], []
        datasets = await self._stores.datasets()
        docs = await datasets.fetch_docs(req.task, adapter.eval_split, doc_ids)
        now = self._clock()
        prompts: list[Prompt] = []
        for doc_id in doc_ids:
            key = sample_key(req.node.node_id, req.task, doc_id, req.epoch)
            prompts.extend(adapter.build_prompts(req.node, doc_id, docs[doc_id], key, now))
        mongo = await self._stores.mongo()
        await mongo.prompts.insert_many(prompts)
        log.info(
            "sampler.sampled node=%s task=%s docs=%d prompts=%d",
            req.node.node_id, req.task, len(doc_ids), len(prompts),
        )
        return doc_ids, prompts
