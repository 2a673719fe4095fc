"""``receipts``: receipts of streaming jobs that validators accepted."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from cluster.storage.mongo.base import Document

log = logging.getLogger(__name__)


class ReceiptStore:
    """Receipts validators accepted; ``_id`` = the receipt's replay key
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
