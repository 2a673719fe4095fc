"""``samples``: scored docs, one per doc, node and TTL epoch."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Mapping, Sequence

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Sample
from cluster.storage.documents import from_document, to_document
from cluster.storage.mongo.base import Document, insert_new

log = logging.getLogger(__name__)

COUNTED_CODES = [int(c) for c in ErrorCode if c.counts_against_node]


class SampleStore:
    """Scored docs; ``_id`` = sample_key (one doc, one node, one TTL epoch)."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def record_samples(self, samples: Sequence[Sample]) -> builtins.list[Sample]:
        """Insert samples with new keys; returns only those (a replay double-counts nothing)."""
        docs = [to_document(s, id_field="sample_key") for s in samples]
        inserted = await insert_new(self.collection, docs)
        if len(inserted) != len(docs):
            log.info("stores.samples.duplicates_ignored n=%d", len(docs) - len(inserted))
        return [samples[i] for i in inserted]

    @staticmethod
    def _query(
        node_id: str | None,
        task: str | None,
        since_ts: float | None,
        counted_only: bool,
    ) -> Document:
        query: Document = {}
        if node_id is not None:
            query["node_id"] = node_id
        if task is not None:
            query["task"] = task
        if since_ts is not None:
            query["created_at"] = {"$gt": float(since_ts)}
        if counted_only:
            query["error_code"] = {"$in": COUNTED_CODES}
        return query

    async def valid_since(
        self, node_id: str, task: str, since_ts: float, *, counted_only: bool = True
    ) -> builtins.list[Sample]:
        """Samples created after ``since_ts`` (oldest first).

        With ``counted_only`` (default) only samples that count against the node (OK, node
        and evaluation errors): bench-side failures are not valid measurements.
        """
        docs = await (
            self.collection.find(self._query(node_id, task, since_ts, counted_only))
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            .to_list()
        )
        return [from_document(Sample, d) for d in docs]

    async def count(
        self,
        *,
        node_id: str | None = None,
        task: str | None = None,
        since_ts: float | None = None,
        counted_only: bool = False,
    ) -> int:
        return await self.collection.count_documents(self._query(node_id, task, since_ts, counted_only))

    async def latest(
        self, node_id: str, task: str, since_ts: float, limit: int
    ) -> builtins.list[Document]:
        """The newest ``limit`` counted samples after ``since_ts``, as documents."""
        return await (
            self.collection.find(self._query(node_id, task, since_ts, True))
            .sort([("created_at", -1), ("_id", -1)])
            .limit(limit)
            .to_list()
        )

    async def latest_for_pairs(
        self, limits: Mapping[tuple[str, str], int], since_ts: float
    ) -> dict[tuple[str, str], builtins.list[Document]]:
        """For each (node, task) of ``limits``: its newest ``limit`` counted samples after
        ``since_ts``, as documents, newest first. One query for all pairs (the Evaluator
        refreshes the buffers of a whole batch at once)."""
        if not limits:
            return {}
        nodes = sorted({node for node, _ in limits})
        tasks = sorted({task for _, task in limits})
        query: Document = {"node_id": {"$in": nodes} if len(nodes) > 1 else nodes[0],
                           "task": {"$in": tasks} if len(tasks) > 1 else tasks[0],
                           "created_at": {"$gt": float(since_ts)},
                           "error_code": {"$in": COUNTED_CODES}}
        out: dict[tuple[str, str], builtins.list[Document]] = {pair: [] for pair in limits}
        for doc in await self.collection.find(query).to_list(None):
            rows = out.get((doc["node_id"], doc["task"]))
            if rows is not None:
                rows.append(doc)
        for pair, rows in out.items():
            rows.sort(key=lambda d: (d["created_at"], d["_id"]), reverse=True)
            del rows[limits[pair]:]
        return out

    async def all_since(self, since_ts: float) -> builtins.list[Document]:
        """Every sample after ``since_ts`` (the Manager's state after a restart)."""
        return await self.collection.find(
            {"created_at": {"$gt": float(since_ts)}},
            {"node_id": 1, "task": 1, "doc_id": 1, "created_at": 1, "error_code": 1},
        ).to_list()

    async def keys_for(self, node_id: str, task: str) -> set[str]:
        docs = await self.collection.find({"node_id": node_id, "task": task}, {"_id": 1}).to_list()
        return {d["_id"] for d in docs}

    async def evidence_since(self, tasks: Sequence[str], since_ts: float
                             ) -> builtins.list[Document]:
        """Node, doc, error code and evidence of every sample of ``tasks`` created after
        ``since_ts`` (the loop's identity signatures)."""
        if not tasks:
            return []
        return await self.collection.find(
            {"task": {"$in": list(tasks)}, "created_at": {"$gt": float(since_ts)}},
            {"node_id": 1, "doc_id": 1, "error_code": 1, "evidence": 1}).to_list(None)

    async def history(self, since_ts: float, limit: int) -> builtins.list[Document]:
        """The newest ``limit`` samples created after ``since_ts`` (node, task, time, error
        code, metrics), newest first: the leaderboard's score series."""
        return await (
            self.collection.find(
                {"created_at": {"$gt": float(since_ts)}},
                {"node_id": 1, "task": 1, "created_at": 1, "error_code": 1, "metrics": 1},
            )
            .sort([("created_at", -1)])
            .limit(limit)
            .to_list()
        )
