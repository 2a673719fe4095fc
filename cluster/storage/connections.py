"""Connections an actor holds: the dataset store (PostgreSQL) and MongoDB.

Actors are constructed synchronously by Ray, so they connect lazily on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cluster.core.settings import Settings
from cluster.storage.mongo import MongoStores
from cluster.storage.postgres import DatasetStore


class StoreConnections:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock_obj: asyncio.Lock | None = None
        self._datasets: DatasetStore | None = None
        self._mongo: MongoStores | None = None

    @property
    def _lock(self) -> asyncio.Lock:
        # Created lazily: this object is pickled into Ray actors before any loop exists.
        if self._lock_obj is None:
            self._lock_obj = asyncio.Lock()
        return self._lock_obj

    def __getstate__(self) -> dict[str, object]:
        return {"_settings": self._settings}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["_settings"])  # type: ignore[misc, arg-type]

    async def datasets(self) -> DatasetStore:
        if self._datasets is None:
            async with self._lock:
                if self._datasets is None:
                    url = self._settings.stores.postgres_url
                    if not url:
                        raise RuntimeError("stores.postgres_url is not set: start the stores first")
                    self._datasets = await DatasetStore.connect(url)
        return self._datasets

    async def mongo(self) -> MongoStores:
        if self._mongo is None:
            async with self._lock:
                if self._mongo is None:
                    url = self._settings.stores.mongo_url
                    if not url:
                        raise RuntimeError("stores.mongo_url is not set: start the stores first")
                    self._mongo = await MongoStores.connect(url, self._settings.stores.mongo_database)
        return self._mongo

    async def close(self) -> None:
        if self._datasets is not None:
            await self._datasets.close()
            self._datasets = None
        if self._mongo is not None:
            await self._mongo.close()
            self._mongo = None


@asynccontextmanager
async def open_mongo(settings: Settings, *, ensure_indexes: bool = True
                     ) -> AsyncIterator[MongoStores]:
    """MongoDB for one command: connected (indexes ensured), closed on exit."""
    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        if ensure_indexes:
            await mongo.ensure_indexes()
        yield mongo
    finally:
        await conns.close()


@asynccontextmanager
async def open_datasets(settings: Settings) -> AsyncIterator[DatasetStore]:
    """The dataset store for one command: connected (schema ensured), closed on exit."""
    conns = StoreConnections(settings)
    try:
        store = await conns.datasets()
        await store.ensure_schema()
        yield store
    finally:
        await conns.close()
