"""``buffers``: per (node, task), the last N samples and their summary, and, for a pair
the loop cannot measure, why (``unmeasurable``: an :class:`UnmeasurablePair` as JSON)."""

from __future__ import annotations

import builtins
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection

from cluster.core.buffers import UnmeasurablePair
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Sample
from cluster.storage.mongo.base import Document


class BufferEntry(BaseModel):
    """One sample as kept in a node's buffer."""

    model_config = ConfigDict(extra="forbid")

    sample_key: str
    doc_id: int
    error_code: ErrorCode
    metrics: dict[str, float] = Field(default_factory=dict)
    latency_s: float | None = None
    created_at: float

    @classmethod
    def from_sample(cls, sample: Sample) -> BufferEntry:
        return cls(
            sample_key=sample.sample_key,
            doc_id=sample.doc_id,
            error_code=sample.error_code,
            metrics=dict(sample.metrics),
            latency_s=sample.latency_s,
            created_at=sample.created_at,
        )


class Buffer(BaseModel):
    """A node's last N samples for one task (oldest first)."""

    model_config = ConfigDict(extra="forbid")

    node_id: str
    task: str
    entries: builtins.list[BufferEntry]
    updated_at: float


def buffer_id(node_id: str, task: str) -> str:
    return f"{node_id}|{task}"


def encode_entry(entry: BufferEntry | Mapping[str, Any] | str) -> str:
    """An entry as stored: canonical JSON (a string passes through: already encoded)."""
    if isinstance(entry, str):
        return entry
    model = entry if isinstance(entry, BufferEntry) else BufferEntry.model_validate(entry)
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def _decode_entry(raw: str | Mapping[str, Any]) -> BufferEntry:
    return BufferEntry.model_validate(json.loads(raw) if isinstance(raw, str) else raw)


def _decode_buffer(doc: Mapping[str, Any]) -> Buffer:
    return Buffer(
        node_id=doc["node_id"],
        task=doc["task"],
        entries=[_decode_entry(e) for e in doc.get("entries", [])],
        updated_at=float(doc.get("updated_at", 0.0)),
    )


class BufferStore:
    """Per (node, task) circular buffer of the last ``size`` samples; ``_id`` = "node|task"."""

    def __init__(self, collection: AsyncCollection[Document], clock: Callable[[], float] = time.time) -> None:
        self.collection = collection
        self._clock = clock

    async def push(
        self, node_id: str, task: str, entries: Sequence[BufferEntry | Mapping[str, Any]], size: int
    ) -> None:
        """Append entries and keep only the last ``size`` (one atomic upsert)."""
        if size < 1:
            raise ValueError(f"buffer size must be >= 1, got {size}")
        if not entries:
            return
        encoded = [encode_entry(e) for e in entries]
        await self.collection.update_one(
            {"_id": buffer_id(node_id, task)},
            {
                "$push": {"entries": {"$each": encoded, "$slice": -size}},
                "$set": {"node_id": node_id, "task": task, "updated_at": float(self._clock())},
            },
            upsert=True,
        )

    async def set_summary(
        self, summary: Mapping[str, Any], entries: Sequence[BufferEntry | Mapping[str, Any]]
    ) -> None:
        """Replace the buffer with ``entries`` and its summary (recomputed from the samples
        collection by the Evaluator, so a replayed evaluation cannot skew it). A whole-document
        replace keeps sub-documents intact on nx-27017, unlike ``$set``/``$push``."""
        await self.set_summaries([(summary, entries)])

    async def set_summaries(
        self,
        buffers: Sequence[tuple[Mapping[str, Any], Sequence[BufferEntry | Mapping[str, Any] | str]]],
        expected: Mapping[tuple[str, str], str] | None = None,
    ) -> dict[tuple[str, str], str] | None:
        """:meth:`set_summary` for many buffers in one bulk write. Samples were scored for
        these pairs, so they measure: the replace drops any ``unmeasurable`` mark.

        Every write gives the buffer a new ``revision``. A pair in ``expected`` is replaced
        only if its buffer still has that revision (a writer that merged new samples into
        what it wrote last). Returns the new revisions, or None when any such pair had
        changed meanwhile (the others are written; the caller recomputes from samples)."""
        if not buffers:
            return {}
        expected = expected or {}
        now = float(self._clock())
        ops = []
        revisions: dict[tuple[str, str], str] = {}
        for summary, entries in buffers:
            node_id, task = summary["node_id"], summary["task"]
            revision = revisions[(node_id, task)] = uuid.uuid4().hex
            doc: Document = {
                "_id": buffer_id(node_id, task),
                "node_id": node_id,
                "task": task,
                "entries": [encode_entry(e) for e in entries],
                "summary": json.dumps(dict(summary), sort_keys=True),
                "updated_at": now,
                "revision": revision,
            }
            if (node_id, task) in expected:
                ops.append(ReplaceOne({"_id": doc["_id"], "revision": expected[(node_id, task)]},
                                      doc))
            else:
                ops.append(ReplaceOne({"_id": doc["_id"]}, doc, upsert=True))
        result = await self.collection.bulk_write(ops, ordered=False)
        if result.matched_count + result.upserted_count < len(ops):
            return None
        return revisions

    async def revisions(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], str | None]:
        """Each pair's buffer revision (None: no buffer, or one no summary wrote), one query."""
        if not pairs:
            return {}
        ids = [buffer_id(node_id, task) for node_id, task in pairs]
        docs = await self.collection.find({"_id": {"$in": ids}}, {"revision": 1}).to_list()
        found = {d["_id"]: d.get("revision") for d in docs}
        return {pair: found.get(key) for pair, key in zip(pairs, ids, strict=True)}

    async def summaries(self) -> builtins.list[dict[str, Any]]:
        """Every buffer's summary (``testbench scores``), ordered by node and task."""
        docs = await self.collection.find({"summary": {"$exists": True}}).sort(
            "_id", ASCENDING).to_list()
        return [json.loads(d["summary"]) for d in docs]

    async def mark_unmeasurable(
        self, node_id: str, task: str, reason: str, attempts: int, now: float | None = None
    ) -> UnmeasurablePair:
        """Record why the pair cannot be measured (its buffer and summary, if any, stay);
        ``since`` is kept from an earlier mark. Only the Manager writes marks."""
        key = buffer_id(node_id, task)
        now = float(self._clock() if now is None else now)
        doc = await self.collection.find_one({"_id": key}, {"unmeasurable": 1})
        since = now
        if doc is not None and isinstance(doc.get("unmeasurable"), str):
            since = UnmeasurablePair.model_validate_json(doc["unmeasurable"]).since
        mark = UnmeasurablePair(node_id=node_id, task=task, reason=reason, since=since,
                                last_attempt_at=now, attempts=attempts)
        await self.collection.update_one(
            {"_id": key},
            {"$set": {"node_id": node_id, "task": task, "unmeasurable": mark.model_dump_json()}},
            upsert=True,
        )
        return mark

    async def clear_unmeasurable(self, node_id: str, task: str) -> bool:
        """The pair measures again: drop its mark. False when it had none."""
        result = await self.collection.update_one(
            {"_id": buffer_id(node_id, task), "unmeasurable": {"$exists": True}},
            {"$unset": {"unmeasurable": ""}},
        )
        return result.modified_count == 1

    async def unmeasurable(self) -> builtins.list[UnmeasurablePair]:
        """Every pair marked unmeasurable, ordered by node and task."""
        docs = await self.collection.find(
            {"unmeasurable": {"$exists": True}}, {"unmeasurable": 1}).sort(
            "_id", ASCENDING).to_list()
        return [UnmeasurablePair.model_validate_json(d["unmeasurable"]) for d in docs
                if isinstance(d.get("unmeasurable"), str)]

    async def get(self, node_id: str, task: str) -> Buffer | None:
        doc = await self.collection.find_one({"_id": buffer_id(node_id, task)})
        return _decode_buffer(doc) if doc is not None else None

    async def all(self) -> builtins.list[Buffer]:
        docs = await self.collection.find({}).sort("_id", ASCENDING).to_list()
        return [_decode_buffer(d) for d in docs]
