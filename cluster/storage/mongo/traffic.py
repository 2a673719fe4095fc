"""``traffic``: per node and day, what the measuring loop and the honesty checks sent it.

One document per (node, UTC day), ``_id`` = ``node|day``, with flat counters (nx-27017
mishandles dotted paths in an upserting ``$inc``): ``m_*`` for measuring traffic (added as
relays are recorded, one bulk write per relay batch), ``v_*`` for verification traffic and
rounds (added as rounds are recorded). Reading a window is one query over
``days × nodes`` small documents, so the Manager can weigh every node's verification
share each step without touching prompts or relays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection

from cluster.storage.mongo.base import Document

DAY_S = 86400.0
MEASURING_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "ok")
VERIFICATION_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "rounds")


def day_of(ts: float) -> int:
    return int(math.floor(ts / DAY_S))


@dataclass
class TrafficRow:
    """A node's counters summed over a window (``last_round_at``: its newest round)."""

    node_id: str
    measuring: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(MEASURING_FIELDS, 0.0))
    verification: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(VERIFICATION_FIELDS, 0.0))
    last_round_at: float | None = None


class TrafficStore:
    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def ensure_indexes(self) -> None:
        await self.collection.create_index([("day", ASCENDING)], name="day")

    async def _add(self, prefix: str, allowed: tuple[str, ...],
                   counts: Mapping[str, Mapping[str, float]], ts: float,
                   extra: Mapping[str, Document] | None = None) -> int:
        day = day_of(ts)
        ops = []
        for node_id, values in counts.items():
            bad = set(values) - set(allowed)
            if bad:
                raise ValueError(f"unknown traffic counters {sorted(bad)}")
            inc = {f"{prefix}{k}": v for k, v in values.items() if v}
            fields: Document = {"node_id": node_id, "day": day, **(extra or {}).get(node_id, {})}
            update: Document = {"$set": fields}
            if inc:
                update["$inc"] = inc
            ops.append(UpdateOne({"_id": f"{node_id}|{day}"}, update, upsert=True))
        if ops:
            await self.collection.bulk_write(ops, ordered=False)
        return len(ops)

    async def add_measuring(self, counts: Mapping[str, Mapping[str, float]], ts: float) -> int:
        """Add relayed traffic per node (``requests``, ``prompt_tokens``,
        ``completion_tokens``, ``ok``) to the day of ``ts``; one bulk write."""
        return await self._add("m_", MEASURING_FIELDS, counts, ts)

    async def add_verification(self, counts: Mapping[str, Mapping[str, float]], ts: float
                               ) -> int:
        """Add a round's traffic per node (``requests``, tokens, ``rounds``) and mark the
        round's time; one bulk write."""
        return await self._add("v_", VERIFICATION_FIELDS, counts, ts,
                               {node_id: {"last_round_at": float(ts)} for node_id in counts})

    async def window(self, since_ts: float) -> dict[str, TrafficRow]:
        """node id -> its counters over the days from ``since_ts``'s day on."""
        out: dict[str, TrafficRow] = {}
        docs = await self.collection.find({"day": {"$gte": day_of(since_ts)}}).to_list()
        for doc in docs:
            node_id = str(doc.get("node_id", ""))
            row = out.get(node_id)
            if row is None:
                row = out[node_id] = TrafficRow(node_id)
            for key in MEASURING_FIELDS:
                row.measuring[key] += float(doc.get(f"m_{key}", 0) or 0)
            for key in VERIFICATION_FIELDS:
                row.verification[key] += float(doc.get(f"v_{key}", 0) or 0)
            at = doc.get("last_round_at")
            if isinstance(at, int | float) and (row.last_round_at is None
                                                or at > row.last_round_at):
                row.last_round_at = float(at)
        return out
