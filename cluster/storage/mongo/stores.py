"""All of the bench's MongoDB stores on one client."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from cluster.storage.errors import StoreUnavailableError, redact_url
from cluster.storage.mongo.base import (
    BUFFERS,
    NODES,
    ORGANIC_JOBS,
    PROMPTS,
    RECEIPTS,
    REFERENCE_DOCS,
    REFERENCE_SETS,
    RELAYS,
    SAMPLES,
    STREAMING_JOBS,
    TRAFFIC,
    VERDICTS,
    Document,
)
from cluster.storage.mongo.buffers import BufferStore
from cluster.storage.mongo.evaluations import EvaluationStore
from cluster.storage.mongo.nodes import NodeStore
from cluster.storage.mongo.organic_jobs import OrganicJobStore
from cluster.storage.mongo.prompts import PromptStore
from cluster.storage.mongo.receipts import ReceiptStore
from cluster.storage.mongo.reference_docs import ReferenceDocStore
from cluster.storage.mongo.reference_sets import ReferenceSetStore
from cluster.storage.mongo.relays import RelayStore
from cluster.storage.mongo.samples import SampleStore
from cluster.storage.mongo.streaming_jobs import StreamingJobStore
from cluster.storage.mongo.traffic import TrafficStore
from cluster.storage.mongo.verdicts import VerdictStore

log = logging.getLogger(__name__)


class MongoStores:
    """The MongoDB collections of the bench. Create with ``await MongoStores.connect(url, db)``."""

    def __init__(
        self,
        client: AsyncMongoClient[Document],
        database: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        # The database itself is for stores built over several collections
        # (EvaluationStore) and for tests that set up documents; product code goes through
        # the stores below.
        self.database: AsyncDatabase[Document] = client[database]
        self.db = self.database
        db = self.database
        self.nodes = NodeStore(db[NODES])
        self.prompts = PromptStore(db[PROMPTS])
        self.relays = RelayStore(db[RELAYS])
        self.samples = SampleStore(db[SAMPLES])
        self.buffers = BufferStore(db[BUFFERS], clock)
        self.receipts = ReceiptStore(db[RECEIPTS], clock)
        self.verdicts = VerdictStore(db[VERDICTS])
        self.organic_jobs = OrganicJobStore(db[ORGANIC_JOBS])
        self.traffic = TrafficStore(db[TRAFFIC])
        self.streaming_jobs = StreamingJobStore(db[STREAMING_JOBS])
        # the trusted reference's per-doc results (paired scores, the traffic check)
        self.reference_docs = ReferenceDocStore(db[REFERENCE_DOCS])
        self.reference_sets = ReferenceSetStore(db[REFERENCE_SETS])
        # Its indexes are made by EvaluationStore.ensure_indexes (the evaluations app).
        self.evaluations = EvaluationStore(self, clock)

    @classmethod
    async def connect(
        cls,
        url: str,
        database: str,
        *,
        ensure_indexes: bool = True,
        timeout_ms: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> MongoStores:
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms
        )
        try:
            await client.admin.command("ping")
        except PyMongoError as err:
            await client.close()
            raise StoreUnavailableError(
                f"cannot reach MongoDB at {redact_url(url)} within {timeout_ms} ms: {type(err).__name__}: {err}"
            ) from err
        stores = cls(client, database, clock)
        if ensure_indexes:
            try:
                await stores.ensure_indexes()
            except BaseException:
                await client.close()
                raise
        log.info("stores.mongo.connected url=%s database=%s", redact_url(url), database)
        return stores

    async def ensure_indexes(self) -> None:
        db = self.database
        # The Manager's sweep for samples to re-drive (every few ticks).
        await db[PROMPTS].create_index([("_done", ASCENDING), ("created_at", ASCENDING)],
                                       name="not_done")
        await db[PROMPTS].create_index([("sample_key", ASCENDING)], name="sample_key")
        await db[RELAYS].create_index([("node_id", ASCENDING), ("task", ASCENDING)], name="node_task")
        await db[SAMPLES].create_index(
            [("node_id", ASCENDING), ("task", ASCENDING), ("created_at", ASCENDING)], name="node_task_created"
        )
        # The Manager's verification step reads a window of days (every step).
        await self.traffic.ensure_indexes()
        await self.reference_docs.ensure_indexes()

    async def close(self) -> None:
        await self.client.close()
