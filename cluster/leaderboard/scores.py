"""Each (node, task) buffer's summary, as ``testbench scores`` and ``make run`` print it,
and the pairs the loop cannot measure."""

from __future__ import annotations

from typing import Any

from cluster.core.buffers import UnmeasurablePair
from cluster.core.settings import Settings
from cluster.storage.connections import open_mongo


async def fetch_scores(settings: Settings) -> list[dict[str, Any]]:
    async with open_mongo(settings) as mongo:
        return await mongo.buffers.summaries()


async def fetch_unmeasurable(settings: Settings) -> list[UnmeasurablePair]:
    async with open_mongo(settings) as mongo:
        return await mongo.buffers.unmeasurable()
