"""``reference_docs``: the trusted reference's result on each doc of a task, one document
per (reference set, doc); ``_id`` = ``set_id|doc_id``, written first-wins.

The requests and generations of a doc are stored as opaque JSON (nothing queries inside
them; see ``cluster/storage/documents.py``)."""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence

from pymongo.asynchronous.collection import AsyncCollection

from cluster.core.paired import ReferenceDoc
from cluster.storage.documents import from_document, opaque_key
from cluster.storage.mongo.base import Document, insert_new

_OPAQUE = ("requests", "generations")


def reference_doc_id(set_id: str, doc_id: int) -> str:
    return f"{set_id}|{doc_id}"


class ReferenceDocStore:
    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def record(self, docs: Sequence[ReferenceDoc]) -> int:
        """Insert results not stored yet; returns how many were new."""
        rows = []
        for doc in docs:
            dumped = doc.model_dump(mode="json")
            row = {k: v for k, v in dumped.items() if k not in _OPAQUE}
            row.update({opaque_key(f): json.dumps(dumped[f], separators=(",", ":"))
                        for f in _OPAQUE})
            rows.append(row | {"_id": reference_doc_id(doc.set_id, doc.doc_id)})
        return len(await insert_new(self.collection, rows))

    async def doc_ids(self, set_id: str) -> builtins.set[int]:
        rows = await self.collection.find({"set_id": set_id}, {"doc_id": 1}).to_list(None)
        return {int(r["doc_id"]) for r in rows}

    async def for_set(self, set_id: str, doc_ids: Sequence[int] | None = None
                      ) -> dict[int, ReferenceDoc]:
        """The set's results (of ``doc_ids``, or all), by doc id."""
        query: Document = {"set_id": set_id}
        if doc_ids is not None:
            query["doc_id"] = {"$in": sorted({int(d) for d in doc_ids})}
        rows = await self.collection.find(query).to_list(None)
        return {int(r["doc_id"]): from_document(ReferenceDoc, r) for r in rows}

    async def delete_set(self, set_id: str) -> int:
        result = await self.collection.delete_many({"set_id": set_id})
        return int(result.deleted_count)

    async def ensure_indexes(self) -> None:
        from pymongo import ASCENDING

        await self.collection.create_index([("set_id", ASCENDING), ("doc_id", ASCENDING)],
                                           name="set_doc")
