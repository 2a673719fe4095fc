"""``auth_nonces``: peer-auth nonces shared by every replica of an app.

It implements ``cluster.auth.peers.NonceStore``; the app that installs peer auth
(``serve_apps/common/peer_auth.py``) hands it to the verifier, as the auth package may not
depend on the stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from cluster.storage.mongo.base import AUTH_NONCES, Document


class MongoNonceStore:
    """One document per nonce, ``_id`` = "key|nonce", so the unique ``_id`` decides the
    race between two replicas. Expired nonces are deleted now and then (no TTL index: the
    embedded nx-27017 has none)."""

    def __init__(
        self,
        collection: AsyncCollection[Document],
        clock: Callable[[], float] = time.time,
        prune_every_s: float = 60.0,
    ) -> None:
        self._collection = collection
        self._clock = clock
        self._prune_every_s = prune_every_s
        self._pruned_at = 0.0

    @classmethod
    def from_url(cls, url: str, database: str, clock: Callable[[], float] = time.time,
                 timeout_ms: int = 10_000) -> MongoNonceStore:
        """A store on its own client (the client connects on first use: an app builds its
        middleware before any event loop runs)."""
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=timeout_ms)
        return cls(client[database][AUTH_NONCES], clock)

    async def first_use(self, key_id: str, nonce: str, expires_at: float) -> bool:
        now = self._clock()
        if now - self._pruned_at > self._prune_every_s:
            self._pruned_at = now
            await self._collection.delete_many({"expires_at": {"$lt": float(now)}})
        try:
            await self._collection.insert_one(
                {"_id": f"{key_id}|{nonce}", "key_id": key_id, "expires_at": float(expires_at)})
        except DuplicateKeyError:
            return False
        return True
