"""Fixtures of the honesty tests: a MongoDB (nx-27017), test nodes, an ASGI app server.

Real servers throughout: nx-27017 through its console script (cheaper than the session's
embedded PostgreSQL + MongoDB pair, which these tests do not need), the project's test
node over HTTP, and uvicorn serving the apps under test in a thread.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from cluster.storage.mongo import MongoStores
from cluster.testing.stores import ExternalMongo
from cluster.testing.testnode import NodeBehaviour, TestNode


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ExternalMongo(tmp_path_factory.mktemp("honesty-mongo"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
async def mongo(mongo_url: str) -> AsyncIterator[MongoStores]:
    """MongoStores on a database of the test's own."""
    stores = await MongoStores.connect(mongo_url, f"h_{uuid.uuid4().hex[:10]}")
    yield stores
    await stores.close()


@pytest.fixture(scope="session")
def honest_node() -> Iterator[TestNode]:
    """Byte-tokenizer test node (no tokenizer load): deterministic answers."""
    node = TestNode(NodeBehaviour())
    node.start_in_thread()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def reference_node() -> Iterator[TestNode]:
    """A second, independent honest node: the trusted reference."""
    node = TestNode(NodeBehaviour())
    node.start_in_thread()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def cheating_node() -> Iterator[TestNode]:
    """A node serving another model: same shapes, different answers."""
    node = TestNode(NodeBehaviour(mode="wrong"))
    node.start_in_thread()
    yield node
    node.stop()
