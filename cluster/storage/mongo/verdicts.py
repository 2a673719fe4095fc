"""``verdicts``: every check's verdicts about nodes, in the one stored shape
(:class:`cluster.core.verdicts.VerdictRecord`)."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterable, Sequence

from pydantic import ValidationError
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from cluster.core.verdicts import Check, VerdictRecord
from cluster.storage.documents import from_document, to_document
from cluster.storage.mongo.base import Document

log = logging.getLogger(__name__)

_OLDEST_FIRST = [("ts", ASCENDING), ("_id", ASCENDING)]


def _records(docs: Iterable[Document]) -> builtins.list[VerdictRecord]:
    """Documents as records; one that is not a :class:`VerdictRecord` (e.g. written by a
    version that stored an unknown as a pass) is left out rather than guessed at."""
    out: builtins.list[VerdictRecord] = []
    skipped: builtins.list[str] = []
    for doc in docs:
        try:
            out.append(from_document(VerdictRecord, doc))
        except ValidationError:
            skipped.append(str(doc.get("_id")))
    if skipped:
        log.warning("stores.verdicts.unreadable n=%d first=%s (not the stored verdict shape: "
                    "re-run the check to replace it)", len(skipped), skipped[0])
    return out


class VerdictStore:
    """``_id`` = verdict_id, written with a whole-document replace so a replayed check
    writes the same document again. Honesty rounds, streaming-job audits and PoC
    validations all write here, and every reader reads :class:`VerdictRecord`."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def record(self, verdicts: Sequence[VerdictRecord]) -> int:
        for verdict in verdicts:
            doc = to_document(verdict, id_field="verdict_id")
            await self.collection.replace_one({"_id": doc["_id"]}, doc, upsert=True)
        return len(verdicts)

    async def for_node(self, node_id: str, check: Check | str | None = None
                       ) -> builtins.list[VerdictRecord]:
        """The node's verdicts (of one check, or all), oldest first (by ts, then id)."""
        query: Document = {"node_id": node_id}
        if check is not None:
            query["check"] = str(check)
        return _records(await self.collection.find(query).sort(_OLDEST_FIRST).to_list())

    async def latest(self, node_ids: Sequence[str] | None = None) -> builtins.list[VerdictRecord]:
        """Each node's newest verdict per check (of ``node_ids``, or of every node), ordered
        by node, then check."""
        query: Document = {} if node_ids is None else {"node_id": {"$in": list(node_ids)}}
        newest: dict[tuple[str, str], VerdictRecord] = {}
        for record in _records(await self.collection.find(query).sort(_OLDEST_FIRST).to_list()):
            newest[(record.node_id, record.check.value)] = record
        return [newest[key] for key in sorted(newest)]
