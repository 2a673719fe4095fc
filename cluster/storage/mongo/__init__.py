"""Durable state in MongoDB, one module per collection: nodes, prompts, relays, samples,
buffers, receipts, verdicts, organic jobs, streaming jobs, traffic counters, peer-auth nonces, evaluation runs (with their
relays, samples, logs and results), the trusted reference's per-doc results and their sets. Product code outside ``cluster.storage`` goes through
these stores, never a collection.

Only a conservative subset of MongoDB is used, so the same code runs on MongoDB and on
the embedded nx-27017 (MongoDB wire protocol over SQLite): CRUD, ``$set``/``$inc``/
``$push`` with ``$each``/``$slice``, unordered bulk inserts, unique ``_id``s, simple
filters (``$in``, ``$gt``...). What nx-27017 0.8.1 gets wrong, and how these stores avoid
it (each checked by tests/cluster/storage/test_stores.py):

- ``$push`` of *sub-documents* into an existing array stores them as JSON strings, so
  buffer entries are stored as canonical JSON strings (scalars survive ``$push``/``$slice``)
  and decoded on read (sub-documents are accepted too);
- ``$set`` of a bool stores 0/1, so store-only flags are ints, and records are validated
  on read (pydantic turns 0/1 back into bools);
- ``$group`` on a compound ``_id`` and nested-path projections return wrong shapes: not used;
- index names are ignored (it names indexes itself): nothing depends on index names.

Idempotency: every record has a deterministic ``_id`` (prompt id, sample key...), inserts
are unordered ``insert_many`` whose duplicate-key errors (11000) are dropped, so replaying
a step never writes a second copy nor overwrites the first.
"""

from cluster.core.verdicts import VerdictRecord
from cluster.storage.mongo.base import (
    AUTH_NONCES,
    BUFFERS,
    DUPLICATE_KEY,
    EVALUATION_LOGS,
    EVALUATION_RELAYS,
    EVALUATION_RESULTS,
    EVALUATION_SAMPLES,
    EVALUATIONS,
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
    insert_new,
)
from cluster.storage.mongo.buffers import Buffer, BufferEntry, BufferStore, buffer_id
from cluster.storage.mongo.evaluations import EvaluationStore, RunConflictError
from cluster.storage.mongo.nodes import NodeStore
from cluster.storage.mongo.nonces import MongoNonceStore
from cluster.storage.mongo.organic_jobs import OrganicJobStore
from cluster.storage.mongo.prompts import PromptStore
from cluster.storage.mongo.receipts import ReceiptStore
from cluster.storage.mongo.reference_docs import ReferenceDocStore
from cluster.storage.mongo.reference_sets import ReferenceSetStore
from cluster.storage.mongo.relays import RelayStore
from cluster.storage.mongo.samples import COUNTED_CODES, SampleStore
from cluster.storage.mongo.stores import MongoStores
from cluster.storage.mongo.streaming_jobs import StreamingJobStore
from cluster.storage.mongo.traffic import TrafficRow, TrafficStore
from cluster.storage.mongo.verdicts import VerdictStore

__all__ = [
    "AUTH_NONCES",
    "BUFFERS",
    "COUNTED_CODES",
    "DUPLICATE_KEY",
    "EVALUATIONS",
    "EVALUATION_LOGS",
    "EVALUATION_RELAYS",
    "EVALUATION_RESULTS",
    "EVALUATION_SAMPLES",
    "NODES",
    "ORGANIC_JOBS",
    "PROMPTS",
    "RECEIPTS",
    "REFERENCE_DOCS",
    "REFERENCE_SETS",
    "RELAYS",
    "SAMPLES",
    "STREAMING_JOBS",
    "TRAFFIC",
    "VERDICTS",
    "Buffer",
    "BufferEntry",
    "BufferStore",
    "Document",
    "EvaluationStore",
    "MongoNonceStore",
    "MongoStores",
    "NodeStore",
    "OrganicJobStore",
    "PromptStore",
    "ReceiptStore",
    "ReferenceDocStore",
    "ReferenceSetStore",
    "RelayStore",
    "RunConflictError",
    "SampleStore",
    "StreamingJobStore",
    "TrafficRow",
    "TrafficStore",
    "VerdictRecord",
    "VerdictStore",
    "buffer_id",
    "insert_new",
]
