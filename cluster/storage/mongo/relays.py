"""``relays``: answers (or failures) of nodes, exactly one per prompt."""

from __future__ import annotations

import builtins
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import bson
from bson.errors import InvalidDocument
from pymongo.asynchronous.collection import AsyncCollection

from cluster.core.schemas import Relay
from cluster.storage.documents import from_document, to_document
from cluster.storage.mongo.base import Document, insert_new

log = logging.getLogger(__name__)


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


_USAGE_BATCH = 1000


def _usage(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    response = doc.get("response")
    if response is None and isinstance(doc.get("_response_json"), str):
        try:
            response = json.loads(doc["_response_json"])
        except ValueError:
            response = None
    usage = response.get("usage") if isinstance(response, Mapping) else None
    return usage if isinstance(usage, Mapping) else None


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

    async def usages(self, prompt_ids: Sequence[str]) -> dict[str, Mapping[str, Any] | None]:
        """prompt_id → the ``usage`` its node reported (None when the answer has none), for
        the prompts that have a relay; only the responses are read, in batches."""
        ids = list(dict.fromkeys(prompt_ids))
        out: dict[str, Mapping[str, Any] | None] = {}
        for start in range(0, len(ids), _USAGE_BATCH):
            for doc in await self.collection.find(
                    {"_id": {"$in": ids[start:start + _USAGE_BATCH]}},
                    {"response": 1, "_response_json": 1}).to_list():
                out[doc["_id"]] = _usage(doc)
        return out

    async def count(self, *, node_id: str | None = None, task: str | None = None) -> int:
        query: Document = {}
        if node_id is not None:
            query["node_id"] = node_id
        if task is not None:
            query["task"] = task
        return await self.collection.count_documents(query)
