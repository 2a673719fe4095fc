"""Recording PoC verdicts: each validation as the one stored verdict (check ``poc``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cluster.poc.validator import Verdict

if TYPE_CHECKING:
    from cluster.storage.mongo import MongoStores


async def record_verdicts(mongo: MongoStores, verdicts: Sequence[Verdict]) -> int:
    """Upsert by ``verdict_id`` (a replayed validation writes the same document again)."""
    return await mongo.verdicts.record([v.to_record() for v in verdicts])
