"""``relays``: answers (or failures) of nodes, exactly one per prompt."""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Relay
from cluster.storage.documents import from_document, opaque_key, to_document
from cluster.storage.mongo.base import Document, insert_new

log = logging.getLogger(__name__)


MAX_RESPONSE_BYTES = 15 * 1024 * 1024  # under MongoDB's 16 MiB, with room for the rest


def _relay_document(relay: Relay) -> Document:
    """A relay's document, its response as JSON text (an opaque field: see
    ``cluster/storage/documents.py``). A node's response is untrusted; as escaped ASCII
    JSON any value it holds is storable (ints over 64 bits, lone surrogates, any nesting),
    and one too large to keep is dropped with ``error`` saying so: the relay itself is never
    lost."""
    doc = to_document(relay, id_field="prompt_id", opaque=("response",))
    raw = doc[RESPONSE_KEY]
    if len(raw) > MAX_RESPONSE_BYTES:
        doc[RESPONSE_KEY] = "null"
        note = f"response not stored: {len(raw)} bytes is over {MAX_RESPONSE_BYTES}"
        doc["error"] = f"{relay.error}; {note}" if relay.error else note
        log.warning("stores.relays.response_dropped prompt=%s bytes=%d", relay.prompt_id, len(raw))
    return doc


def _relay_documents(relays: Sequence[Relay]) -> builtins.list[Document]:
    return [_relay_document(r) for r in relays]


RESPONSE_KEY = opaque_key("response")


def _relay_from_document(doc: Mapping[str, Any]) -> Relay:
    return from_document(Relay, doc)


_USAGE_BATCH = 1000


def _usage(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    response = doc.get("response")  # documents written by hand in tests, or older ones
    if response is None and isinstance(doc.get(RESPONSE_KEY), str):
        try:
            response = json.loads(doc[RESPONSE_KEY])
        except ValueError:
            response = None
    usage = response.get("usage") if isinstance(response, Mapping) else None
    return usage if isinstance(usage, Mapping) else None


class RelayStore:
    """Answers (or failures) of nodes; ``_id`` = prompt_id: exactly one relay per prompt."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def record_relays(self, relays: Sequence[Relay]) -> builtins.list[Relay]:
        """Insert relays for prompts that have none; returns those inserted.

        A second relay for the same prompt is ignored: the first one stays as it was.
        """
        # Encoded in a worker thread: the responses' JSON (a few ms each for echoed prompt
        # logprobs) would otherwise hold the event loop of the process that relays them,
        # which sends a node its next request only once it gets the loop back.
        docs = await asyncio.to_thread(_relay_documents, relays)
        inserted = await insert_new(self.collection, docs)
        if len(inserted) != len(docs):
            log.info("stores.relays.duplicates_ignored n=%d", len(docs) - len(inserted))
        return [relays[i] for i in inserted]

    async def get_for_prompts(self, prompt_ids: Sequence[str]) -> dict[str, Relay]:
        """prompt_id → relay, for the prompts that have one."""
        if not prompt_ids:
            return {}
        docs = await self.collection.find({"_id": {"$in": list(dict.fromkeys(prompt_ids))}}).to_list()
        return {d["_id"]: _relay_from_document(d) for d in docs}

    async def usages(self, prompt_ids: Sequence[str]) -> dict[str, Mapping[str, Any] | None]:
        """prompt_id → the ``usage`` its node reported (None when the answer has none), for
        the prompts that have a relay; only the responses are read, in batches."""
        ids = list(dict.fromkeys(prompt_ids))
        out: dict[str, Mapping[str, Any] | None] = {}
        for start in range(0, len(ids), _USAGE_BATCH):
            for doc in await self.collection.find(
                    {"_id": {"$in": ids[start:start + _USAGE_BATCH]}},
                    {"response": 1, RESPONSE_KEY: 1}).to_list():
                out[doc["_id"]] = _usage(doc)
        return out

    async def answered_since(self, node_id: str, since_ts: float) -> tuple[int, int]:
        """(relays, ok relays) of ``node_id`` started at or after ``since_ts``."""
        query: Document = {"node_id": node_id, "started_at": {"$gte": float(since_ts)}}
        total = await self.collection.count_documents(query)
        ok = await self.collection.count_documents({**query, "error_code": int(ErrorCode.OK)}) if total else 0
        return total, ok

    async def count(self, *, node_id: str | None = None, task: str | None = None) -> int:
        query: Document = {}
        if node_id is not None:
            query["node_id"] = node_id
        if task is not None:
            query["task"] = task
        return await self.collection.count_documents(query)
