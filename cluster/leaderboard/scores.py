"""Each (node, task) buffer's summary, as ``testbench scores`` and ``make run`` print it."""

from __future__ import annotations

from typing import Any

from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections


async def fetch_scores(settings: Settings) -> list[dict[str, Any]]:
    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        await mongo.ensure_indexes()
        return await mongo.buffers.summaries()
    finally:
        await conns.close()
