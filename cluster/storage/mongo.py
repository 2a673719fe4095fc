"""Durable state in MongoDB (DESIGN §4): nodes, prompts, relays, samples, buffers.

Only a conservative subset of MongoDB is used, so the same code runs on MongoDB and on
the embedded nx-27017 (MongoDB wire protocol over SQLite): CRUD, ``$set``/``$inc``/
``$push`` with ``$each``/``$slice``, unordered bulk inserts, unique ``_id``s, simple
filters (``$in``, ``$gt``...). What nx-27017 0.8.1 gets wrong, and how this module avoids
it (each checked by tests/cluster/storage/test_stores.py):

- ``$push`` of *sub-documents* into an existing array stores them as JSON strings, so
  buffer entries are stored as canonical JSON strings (scalars survive ``$push``/``$slice``)
  and decoded on read (sub-documents are accepted too);
- ``$set`` of a bool stores 0/1, so store-only flags are ints, and records are validated
  on read (pydantic turns 0/1 back into bools);
- ``$group`` on a compound ``_id`` and nested-path projections return wrong shapes: not used;
- index names are ignored (it names indexes itself): nothing depends on index names.

Idempotency: every record has a deterministic ``_id`` (prompt id, sample key...), inserts
are unordered ``insert_many`` whose duplicate-key errors (11000) are dropped, so replaying
a step never writes a second copy nor overwrites the first.
"""

from __future__ import annotations

import builtins
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import bson
from bson.errors import InvalidDocument
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from cluster.core.errors import ErrorCode, RegistrationError
from cluster.core.schemas import Node, Prompt, Relay, Sample
from cluster.storage.documents import from_document, to_document
from cluster.storage.errors import StoreUnavailableError, redact_url

log = logging.getLogger(__name__)

Document = dict[str, Any]
DUPLICATE_KEY = 11000

NODES = "nodes"
PROMPTS = "prompts"
RELAYS = "relays"
SAMPLES = "samples"
BUFFERS = "buffers"
RECEIPTS = "receipts"
VERDICTS = "verdicts"

COUNTED_CODES = [int(c) for c in ErrorCode if c.counts_against_node]


async def insert_new(collection: AsyncCollection[Document], docs: Sequence[Document]) -> list[int]:
    """Insert ``docs`` (each with an ``_id``), ignoring those whose ``_id`` already exists.

    Returns the indexes (into ``docs``) of the documents actually inserted. Any error
    other than a duplicate key is raised.
    """
    if not docs:
        return []
    try:
        await collection.insert_many(docs, ordered=False)
    except BulkWriteError as err:
        errors = err.details.get("writeErrors", [])
        others = [e for e in errors if e.get("code") != DUPLICATE_KEY]
        if others:
            raise
        duplicates = {int(e["index"]) for e in errors}
        return [i for i in range(len(docs)) if i not in duplicates]
    return list(range(len(docs)))


def _keep_order(ids: Sequence[str], docs: Iterable[Document]) -> builtins.list[Document]:
    by_id = {d["_id"]: d for d in docs}
    return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]


class NodeStore:
    """The registry of untrusted endpoints; ``_id`` = node_id."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def add(self, node: Node | Mapping[str, Any]) -> Node:
        """Register a node; RegistrationError when it is invalid or its id is taken."""
        if not isinstance(node, Node):
            try:
                node = Node.model_validate(node)
            except ValidationError as err:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'node'}: {e['msg']}" for e in err.errors()
                )
                raise RegistrationError(f"invalid node: {problems}") from err
        try:
            await self.collection.insert_one(to_document(node, id_field="node_id"))
        except DuplicateKeyError as err:
            raise RegistrationError(
                f"node {node.node_id!r} is already registered; remove it first to change it"
            ) from err
        log.info("stores.nodes.added node=%s url=%s model=%s", node.node_id, node.base_url, node.model)
        return node

    async def get(self, node_id: str) -> Node | None:
        doc = await self.collection.find_one({"_id": node_id})
        return from_document(Node, doc) if doc is not None else None

    async def list(self, *, enabled_only: bool = False) -> builtins.list[Node]:
        docs = await self.collection.find({}).sort("_id", ASCENDING).to_list()
        nodes = [from_document(Node, d) for d in docs]
        return [n for n in nodes if n.enabled] if enabled_only else nodes

    async def remove(self, node_id: str) -> bool:
        result = await self.collection.delete_one({"_id": node_id})
        if result.deleted_count:
            log.info("stores.nodes.removed node=%s", node_id)
        return result.deleted_count == 1

    async def set_enabled(self, node_id: str, enabled: bool) -> bool:
        """False when there is no such node."""
        result = await self.collection.update_one({"_id": node_id}, {"$set": {"enabled": bool(enabled)}})
        if result.matched_count:
            log.info("stores.nodes.set_enabled node=%s enabled=%s", node_id, enabled)
        return result.matched_count == 1


class PromptStore:
    """Requests sent (or to send) to nodes; ``_id`` = prompt_id.

    ``_relayed`` (0/1) marks prompts that have a relay; it is set by ``RelayStore`` and
    re-checked against the relays, so a crash between the two writes heals itself.
    """

    def __init__(self, collection: AsyncCollection[Document], relays: AsyncCollection[Document]) -> None:
        self.collection = collection
        self._relays = relays

    async def insert_many(self, prompts: Sequence[Prompt]) -> int:
        """Insert prompts whose id is new; returns how many were inserted."""
        docs = [to_document(p, id_field="prompt_id", _relayed=0, _done=0) for p in prompts]
        inserted = await insert_new(self.collection, docs)
        if len(inserted) != len(docs):
            log.info("stores.prompts.duplicates_ignored n=%d", len(docs) - len(inserted))
        return len(inserted)

    async def pending_without_relay(self, limit: int) -> builtins.list[Prompt]:
        """Oldest prompts that have no relay yet (at most ``limit``)."""
        if limit <= 0:
            return []
        out: builtins.list[Prompt] = []
        while len(out) < limit:
            batch = await (
                self.collection.find({"_relayed": 0})
                .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
                .skip(len(out))
                .limit(limit - len(out))
                .to_list()
            )
            if not batch:
                break
            ids = [d["_id"] for d in batch]
            relayed = {d["_id"] for d in await self._relays.find({"_id": {"$in": ids}}, {"_id": 1}).to_list()}
            out.extend(from_document(Prompt, d) for d in batch if d["_id"] not in relayed)
            if not relayed:
                break
            # A crash between a relay's insert and its flag: fix the flag, then look further.
            await self.collection.update_many({"_id": {"$in": sorted(relayed)}}, {"$set": {"_relayed": 1}})
            log.info("stores.prompts.relayed_flag_repaired n=%d", len(relayed))
        return out

    async def mark_done(self, sample_keys: Sequence[str]) -> None:
        """The samples of these keys are recorded: their prompts need no more driving."""
        if sample_keys:
            await self.collection.update_many(
                {"sample_key": {"$in": list(dict.fromkeys(sample_keys))}}, {"$set": {"_done": 1}}
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

    async def get(self, prompt_ids: Sequence[str]) -> builtins.list[Prompt]:
        """Prompts in the order of ``prompt_ids``; unknown ids are skipped."""
        if not prompt_ids:
            return []
        docs = await self.collection.find({"_id": {"$in": list(dict.fromkeys(prompt_ids))}}).to_list()
        return [from_document(Prompt, d) for d in _keep_order(prompt_ids, docs)]

    async def by_sample_keys(self, keys: Sequence[str]) -> dict[str, builtins.list[Prompt]]:
        """sample_key → its prompts ordered by request_index (keys without prompts are absent)."""
        if not keys:
            return {}
        docs = await self.collection.find({"sample_key": {"$in": list(dict.fromkeys(keys))}}).to_list()
        out: dict[str, builtins.list[Prompt]] = {}
        for prompt in sorted((from_document(Prompt, d) for d in docs), key=lambda p: p.request_index):
            out.setdefault(prompt.sample_key, []).append(prompt)
        return out


MAX_DOCUMENT_BYTES = 15 * 1024 * 1024  # under MongoDB's 16 MiB, with room for the rest
MAX_NESTING = 90  # MongoDB refuses documents nested deeper than 100 levels


def _nesting(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in item)
    return depth


def _unstorable(doc: Document) -> str | None:
    """Why MongoDB would refuse ``doc`` (None when it would not)."""
    try:
        size = len(bson.encode(doc))
    except (InvalidDocument, UnicodeEncodeError, OverflowError, ValueError, RecursionError) as err:
        return f"{type(err).__name__}: {err}"[:300]
    if size > MAX_DOCUMENT_BYTES:
        return f"{size} bytes is over {MAX_DOCUMENT_BYTES}"
    if _nesting(doc) > MAX_NESTING:
        return f"nested deeper than {MAX_NESTING} levels"
    return None


def _relay_document(relay: Relay) -> Document:
    """A relay's document. A node's response is untrusted: when MongoDB cannot hold it as
    is (ints over 64 bits, lone surrogates, too deep), it is kept as JSON text in
    ``_response_json`` and restored on read; when it cannot be kept at all (too large),
    it is dropped and ``error`` says so. Either way the relay itself is never lost."""
    doc = to_document(relay, id_field="prompt_id")
    problem = _unstorable(doc)
    if problem is None:
        return doc
    doc["response"] = None
    try:
        raw: str | None = json.dumps(relay.response, ensure_ascii=True)
    except (ValueError, TypeError, RecursionError):
        raw = None
    if raw is not None and len(raw) <= MAX_DOCUMENT_BYTES:
        doc["_response_json"] = raw
        log.warning("stores.relays.response_as_text prompt=%s reason=%s", relay.prompt_id, problem)
    else:
        note = f"response not stored: {problem}"
        doc["error"] = f"{relay.error}; {note}" if relay.error else note
        log.warning("stores.relays.response_dropped prompt=%s reason=%s", relay.prompt_id, problem)
    return doc


def _relay_from_document(doc: Mapping[str, Any]) -> Relay:
    if "_response_json" in doc:
        doc = {**doc, "response": json.loads(doc["_response_json"])}
    return from_document(Relay, doc)


class RelayStore:
    """Answers (or failures) of nodes; ``_id`` = prompt_id: exactly one relay per prompt."""

    def __init__(self, collection: AsyncCollection[Document], prompts: AsyncCollection[Document]) -> None:
        self.collection = collection
        self._prompts = prompts

    async def record_relays(self, relays: Sequence[Relay]) -> builtins.list[Relay]:
        """Insert relays for prompts that have none; returns those inserted.

        A second relay for the same prompt is ignored: the first one stays as it was.
        """
        docs = [_relay_document(r) for r in relays]
        inserted = await insert_new(self.collection, docs)
        if relays:
            ids = list({r.prompt_id for r in relays})
            await self._prompts.update_many({"_id": {"$in": ids}}, {"$set": {"_relayed": 1}})
        if len(inserted) != len(docs):
            log.info("stores.relays.duplicates_ignored n=%d", len(docs) - len(inserted))
        return [relays[i] for i in inserted]

    async def get_for_prompts(self, prompt_ids: Sequence[str]) -> dict[str, Relay]:
        """prompt_id → relay, for the prompts that have one."""
        if not prompt_ids:
            return {}
        docs = await self.collection.find({"_id": {"$in": list(dict.fromkeys(prompt_ids))}}).to_list()
        return {d["_id"]: _relay_from_document(d) for d in docs}

    async def count(self, *, node_id: str | None = None, task: str | None = None) -> int:
        query: Document = {}
        if node_id is not None:
            query["node_id"] = node_id
        if task is not None:
            query["task"] = task
        return await self.collection.count_documents(query)


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

    async def all_since(self, since_ts: float) -> builtins.list[Document]:
        """Every sample after ``since_ts`` (the Manager's state after a restart)."""
        return await self.collection.find(
            {"created_at": {"$gt": float(since_ts)}},
            {"node_id": 1, "task": 1, "doc_id": 1, "created_at": 1, "error_code": 1},
        ).to_list()

    async def keys_for(self, node_id: str, task: str) -> set[str]:
        docs = await self.collection.find({"node_id": node_id, "task": task}, {"_id": 1}).to_list()
        return {d["_id"] for d in docs}


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


def _encode_entry(entry: BufferEntry | Mapping[str, Any]) -> str:
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
        encoded = [_encode_entry(e) for e in entries]
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
        node_id, task = summary["node_id"], summary["task"]
        doc: Document = {
            "_id": buffer_id(node_id, task),
            "node_id": node_id,
            "task": task,
            "entries": [_encode_entry(e) for e in entries],
            "summary": json.dumps(dict(summary), sort_keys=True),
            "updated_at": float(self._clock()),
        }
        await self.collection.replace_one({"_id": doc["_id"]}, doc, upsert=True)

    async def summaries(self) -> builtins.list[dict[str, Any]]:
        """Every buffer's summary (``testbench scores``), ordered by node and task."""
        docs = await self.collection.find({"summary": {"$exists": True}}).sort(
            "_id", ASCENDING).to_list()
        return [json.loads(d["summary"]) for d in docs]

    async def get(self, node_id: str, task: str) -> Buffer | None:
        doc = await self.collection.find_one({"_id": buffer_id(node_id, task)})
        return _decode_buffer(doc) if doc is not None else None

    async def all(self) -> builtins.list[Buffer]:
        docs = await self.collection.find({}).sort("_id", ASCENDING).to_list()
        return [_decode_buffer(d) for d in docs]


class ReceiptStore:
    """Receipts validators accepted (DESIGN §5); ``_id`` = the receipt's replay key
    ("job|request"), so a receipt counts once, across validator restarts and processes.

    A plain ``insert_one`` on a unique ``_id`` is the whole protocol (no read-then-write
    race): the insert that wins records the receipt; any later one sees a duplicate key.
    """

    def __init__(self, collection: AsyncCollection[Document], clock: Callable[[], float] = time.time) -> None:
        self.collection = collection
        self._clock = clock

    async def claim(self, replay_key: str, digest: str, fields: Mapping[str, Any]) -> str | None:
        """Record the receipt the first time ``replay_key`` is seen and return None; else
        return the digest recorded under it (equal to ``digest`` for the same receipt)."""
        doc: Document = {**fields, "_id": replay_key, "digest": digest,
                         "accepted_at": float(self._clock())}
        try:
            await self.collection.insert_one(doc)
        except DuplicateKeyError:
            existing = await self.collection.find_one({"_id": replay_key}, {"digest": 1})
            log.info("stores.receipts.replay key=%s", replay_key)
            return str(existing.get("digest", "")) if existing else ""
        return None

    async def get(self, replay_key: str) -> Document | None:
        return await self.collection.find_one({"_id": replay_key})

    async def count(self, *, job_id: str | None = None) -> int:
        return await self.collection.count_documents({} if job_id is None else {"job_id": job_id})


class VerdictRecord(BaseModel):
    """One honesty verdict about a node: which check, pass or fail, why, and the evidence.

    ``evidence`` is kept to strings, numbers and lists/dicts of them (MongoDB stand-ins
    turn bools into 0/1)."""

    model_config = ConfigDict(extra="forbid")

    verdict_id: str = Field(min_length=1)
    node_id: str
    check: str = Field(min_length=1)
    verdict: Literal["pass", "fail"]
    reason: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    ts: float


class VerdictStore:
    """Honesty verdicts (``verdicts`` collection); ``_id`` = verdict_id, written with a
    whole-document replace so a replayed check writes the same document again.

    The PoC validator writes its own verdict shape here too (``kind: "poc"``); reads
    select documents that have a ``check`` field."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def record(self, verdicts: Sequence[VerdictRecord]) -> int:
        for verdict in verdicts:
            doc = to_document(verdict, id_field="verdict_id")
            await self.collection.replace_one({"_id": doc["_id"]}, doc, upsert=True)
        return len(verdicts)

    async def for_node(self, node_id: str, check: str | None = None) -> builtins.list[VerdictRecord]:
        """The node's verdicts, oldest first (by ts, then id)."""
        query: Document = {"node_id": node_id, "check": {"$exists": True} if check is None else check}
        docs = await self.collection.find(query).sort([("ts", ASCENDING), ("_id", ASCENDING)]).to_list()
        return [from_document(VerdictRecord, d) for d in docs]


class MongoStores:
    """The MongoDB collections of the bench. Create with ``await MongoStores.connect(url, db)``."""

    def __init__(
        self,
        client: AsyncMongoClient[Document],
        database: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.database: AsyncDatabase[Document] = client[database]
        self.db = self.database
        db = self.database
        self.nodes = NodeStore(db[NODES])
        self.prompts = PromptStore(db[PROMPTS], db[RELAYS])
        self.relays = RelayStore(db[RELAYS], db[PROMPTS])
        self.samples = SampleStore(db[SAMPLES])
        self.buffers = BufferStore(db[BUFFERS], clock)
        self.receipts = ReceiptStore(db[RECEIPTS], clock)
        self.verdicts = VerdictStore(db[VERDICTS])

    @classmethod
    async def connect(
        cls,
        url: str,
        database: str,
        *,
        ensure_indexes: bool = True,
        timeout_ms: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> MongoStores:
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms
        )
        try:
            await client.admin.command("ping")
        except PyMongoError as err:
            await client.close()
            raise StoreUnavailableError(
                f"cannot reach MongoDB at {redact_url(url)} within {timeout_ms} ms: {type(err).__name__}: {err}"
            ) from err
        stores = cls(client, database, clock)
        if ensure_indexes:
            try:
                await stores.ensure_indexes()
            except BaseException:
                await client.close()
                raise
        log.info("stores.mongo.connected url=%s database=%s", redact_url(url), database)
        return stores

    def collection(self, name: str) -> AsyncCollection[Document]:
        """Any other collection of the bench's database (verdicts, receipts, jobs...)."""
        return self.database[name]

    async def ensure_indexes(self) -> None:
        db = self.database
        await db[PROMPTS].create_index([("_relayed", ASCENDING), ("created_at", ASCENDING)], name="pending")
        await db[PROMPTS].create_index([("sample_key", ASCENDING)], name="sample_key")
        await db[RELAYS].create_index([("node_id", ASCENDING), ("task", ASCENDING)], name="node_task")
        await db[SAMPLES].create_index(
            [("node_id", ASCENDING), ("task", ASCENDING), ("created_at", ASCENDING)], name="node_task_created"
        )

    async def close(self) -> None:
        await self.client.close()
