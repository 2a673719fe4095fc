"""What every collection's store shares: the document type, the collection names, and the
idempotent insert (an unordered ``insert_many`` whose duplicate-key errors are dropped)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

Document = dict[str, Any]
DUPLICATE_KEY = 11000

NODES = "nodes"
PROMPTS = "prompts"
RELAYS = "relays"
SAMPLES = "samples"
BUFFERS = "buffers"
RECEIPTS = "receipts"
VERDICTS = "verdicts"
ORGANIC_JOBS = "organic_jobs"
STREAMING_JOBS = "streaming_jobs"
TRAFFIC = "traffic"
REFERENCE_DOCS = "reference_docs"
REFERENCE_SETS = "reference_sets"
AUTH_NONCES = "auth_nonces"
EVALUATIONS = "evaluations"
EVALUATION_RELAYS = "evaluation_relays"
EVALUATION_SAMPLES = "evaluation_samples"
EVALUATION_LOGS = "evaluation_logs"
EVALUATION_RESULTS = "evaluation_results"


class HasDatabase(Protocol):
    """The database a store over several collections is built on
    (:class:`~cluster.storage.mongo.stores.MongoStores` is one)."""

    @property
    def database(self) -> AsyncDatabase[Document]: ...


async def insert_new(collection: AsyncCollection[Document], docs: Sequence[Document]) -> list[int]:
    """Insert ``docs`` (each with an ``_id``), ignoring those whose ``_id`` already exists.

    Returns the indexes (into ``docs``) of the documents actually inserted. Any error
    other than a duplicate key is raised.
    """
    if not docs:
        return []
    try:
        await collection.insert_many(docs, ordered=False)
    except BulkWriteError as err:
        errors = err.details.get("writeErrors", [])
        others = [e for e in errors if e.get("code") != DUPLICATE_KEY]
        if others:
            raise
        duplicates = {int(e["index"]) for e in errors}
        return [i for i in range(len(docs)) if i not in duplicates]
    return list(range(len(docs)))


def keep_order(ids: Sequence[str], docs: Iterable[Document]) -> list[Document]:
    by_id = {d["_id"]: d for d in docs}
    return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]
