"""Stores: task datasets in PostgreSQL, the bench's durable state in MongoDB."""

from cluster.storage.documents import from_document, to_document
from cluster.storage.errors import StoreUnavailableError
from cluster.storage.mongo import (
    Buffer,
    BufferEntry,
    BufferStore,
    MongoStores,
    NodeStore,
    PromptStore,
    RelayStore,
    SampleStore,
)
from cluster.storage.postgres import DatasetStore, RegistryEntry, dataset_table_name

__all__ = [
    "Buffer",
    "BufferEntry",
    "BufferStore",
    "DatasetStore",
    "MongoStores",
    "NodeStore",
    "PromptStore",
    "RegistryEntry",
    "RelayStore",
    "SampleStore",
    "StoreUnavailableError",
    "dataset_table_name",
    "from_document",
    "to_document",
]
