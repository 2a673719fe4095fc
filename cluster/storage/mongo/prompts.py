"""``prompts``: requests sent (or to send) to nodes."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence

from pymongo.asynchronous.collection import AsyncCollection

from cluster.core.schemas import Prompt
from cluster.storage.documents import from_document, to_document
from cluster.storage.mongo.base import Document, insert_new, keep_order

log = logging.getLogger(__name__)


class PromptStore:
    """Requests sent (or to send) to nodes; ``_id`` = prompt_id.

    ``_done`` (0/1) marks prompts whose sample is recorded; the Manager re-drives the
    samples of prompts still not done after a while (a crash anywhere on the way).
    """

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def insert_many(self, prompts: Sequence[Prompt]) -> int:
        """Insert prompts whose id is new; returns how many were inserted."""
        docs = [to_document(p, id_field="prompt_id", opaque=("body",), _done=0) for p in prompts]
        inserted = await insert_new(self.collection, docs)
        if len(inserted) != len(docs):
            log.info("stores.prompts.duplicates_ignored n=%d", len(docs) - len(inserted))
        return len(inserted)

    async def mark_done(self, prompt_ids: Sequence[str]) -> None:
        """The samples of these prompts are recorded: they need no more driving."""
        if prompt_ids:
            await self.collection.update_many(
                {"_id": {"$in": list(dict.fromkeys(prompt_ids))}}, {"$set": {"_done": 1}}
            )

    async def pending_sample_keys(
        self, older_than: float
    ) -> builtins.list[tuple[str, str, str]]:
        """(sample_key, node_id, task) of samples whose prompts were created before
        ``older_than`` and have no recorded sample yet: orphans to re-drive."""
        docs = await self.collection.find(
            {"_done": 0, "created_at": {"$lt": float(older_than)}},
            {"sample_key": 1, "node_id": 1, "task": 1},
        ).to_list()
        seen: dict[str, tuple[str, str, str]] = {}
        for d in docs:
            seen.setdefault(d["sample_key"], (d["sample_key"], d["node_id"], d["task"]))
        return list(seen.values())

    async def created_since(self, node_id: str, since_ts: float) -> builtins.list[Document]:
        """``_id``, ``prompt_tokens`` and ``max_output_tokens`` of the node's prompts created
        after ``since_ts``, relayed or not (the measuring traffic it was sent)."""
        return await self.collection.find(
            {"node_id": node_id, "created_at": {"$gt": float(since_ts)}},
            {"prompt_tokens": 1, "max_output_tokens": 1},
        ).to_list()

    async def get(self, prompt_ids: Sequence[str]) -> builtins.list[Prompt]:
        """Prompts in the order of ``prompt_ids``; unknown ids are skipped."""
        if not prompt_ids:
            return []
        docs = await self.collection.find({"_id": {"$in": list(dict.fromkeys(prompt_ids))}}).to_list()
        return [from_document(Prompt, d) for d in keep_order(prompt_ids, docs)]

    async def by_sample_keys(self, keys: Sequence[str]) -> dict[str, builtins.list[Prompt]]:
        """sample_key → its prompts ordered by request_index (keys without prompts are absent)."""
        if not keys:
            return {}
        docs = await self.collection.find({"sample_key": {"$in": list(dict.fromkeys(keys))}}).to_list()
        out: dict[str, builtins.list[Prompt]] = {}
        for prompt in sorted((from_document(Prompt, d) for d in docs), key=lambda p: p.request_index):
            out.setdefault(prompt.sample_key, []).append(prompt)
        return out
