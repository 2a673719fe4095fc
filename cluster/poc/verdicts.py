"""Recording PoC verdicts in MongoDB (``verdicts`` collection, one document per verdict)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cluster.poc.validator import Verdict

if TYPE_CHECKING:
    from cluster.storage.mongo import MongoStores

VERDICTS = "verdicts"


async def record_verdicts(mongo: MongoStores, verdicts: Sequence[Verdict]) -> int:
    """Upsert by ``verdict_id`` (a replayed validation writes the same document again)."""
    collection = mongo.collection(VERDICTS)
    for verdict in verdicts:
        doc = verdict.to_document()
        await collection.replace_one({"_id": doc["_id"]}, doc, upsert=True)
    return len(verdicts)
