"""``reference_sets``: per (claimed model, task, task content, reference, prompting) how far
the trusted reference's per-doc results are computed, and the full-task scores once they
are all in (:class:`cluster.core.paired.ReferenceSet`); ``_id`` = ``set_id``, written with a
whole-document replace."""

from __future__ import annotations

import builtins
from collections.abc import Sequence

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from cluster.core.paired import DEFAULT_PROMPTING, ReferenceSet
from cluster.storage.documents import from_document, to_document
from cluster.storage.mongo.base import Document


class ReferenceSetStore:
    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def put(self, reference: ReferenceSet) -> None:
        doc = to_document(reference, id_field="set_id")
        await self.collection.replace_one({"_id": doc["_id"]}, doc, upsert=True)

    async def get(self, set_id: str) -> ReferenceSet | None:
        doc = await self.collection.find_one({"_id": set_id})
        return from_document(ReferenceSet, doc) if doc is not None else None

    async def for_task(self, model: str, task: str) -> builtins.list[ReferenceSet]:
        docs = await self.collection.find({"model": model, "task": task}).sort(
            "started_at", ASCENDING).to_list(None)
        return [from_document(ReferenceSet, d) for d in docs]

    async def usable(self, pairs: Sequence[tuple[str, str]] | None = None,
                     prompting: str = DEFAULT_PROMPTING) -> dict[tuple[str, str], ReferenceSet]:
        """(model, task) → its newest complete set that is not stale (of ``pairs``, or all)."""
        query: Document = {"prompting": prompting}
        if pairs is not None:
            if not pairs:
                return {}
            query["task"] = {"$in": sorted({t for _, t in pairs})}
        out: dict[tuple[str, str], ReferenceSet] = {}
        for doc in await self.collection.find(query).sort("started_at", ASCENDING).to_list(None):
            found = from_document(ReferenceSet, doc)
            key = (found.model, found.task)
            if found.complete and not found.stale and (pairs is None or key in pairs):
                out[key] = found
        return out

    async def all(self) -> builtins.list[ReferenceSet]:
        docs = await self.collection.find({}).sort("_id", ASCENDING).to_list(None)
        return [from_document(ReferenceSet, d) for d in docs]

    async def delete(self, set_id: str) -> bool:
        result = await self.collection.delete_one({"_id": set_id})
        return result.deleted_count == 1
