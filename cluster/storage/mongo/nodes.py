"""``nodes``: the registry of untrusted endpoints."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from cluster.core.errors import RegistrationError
from cluster.core.schemas import Node
from cluster.storage.documents import from_document, to_document
from cluster.storage.mongo.base import Document, insert_new

log = logging.getLogger(__name__)


class NodeStore:
    """The registry of untrusted endpoints; ``_id`` = node_id."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def add(self, node: Node | Mapping[str, Any]) -> Node:
        """Register a node; RegistrationError when it is invalid or its id is taken."""
        if not isinstance(node, Node):
            try:
                node = Node.model_validate(node)
            except ValidationError as err:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'node'}: {e['msg']}" for e in err.errors()
                )
                raise RegistrationError(f"invalid node: {problems}") from err
        try:
            await self.collection.insert_one(to_document(node, id_field="node_id"))
        except DuplicateKeyError as err:
            raise RegistrationError(
                f"node {node.node_id!r} is already registered; remove it first to change it"
            ) from err
        log.info("stores.nodes.added node=%s url=%s model=%s", node.node_id, node.base_url, node.model)
        return node

    async def add_many(self, nodes: Sequence[Node]) -> int:
        """Register valid nodes in one bulk insert (ids already taken are skipped); returns
        how many were added. For fleets of simulated nodes, where one insert per node would
        time the store rather than the loop."""
        added = await insert_new(self.collection, [to_document(n, id_field="node_id")
                                                   for n in nodes])
        log.info("stores.nodes.added_many n=%d skipped=%d", len(added), len(nodes) - len(added))
        return len(added)

    async def get(self, node_id: str) -> Node | None:
        doc = await self.collection.find_one({"_id": node_id})
        return from_document(Node, doc) if doc is not None else None

    async def list(self, *, enabled_only: bool = False) -> builtins.list[Node]:
        docs = await self.collection.find({}).sort("_id", ASCENDING).to_list()
        nodes = [from_document(Node, d) for d in docs]
        return [n for n in nodes if n.enabled] if enabled_only else nodes

    async def remove(self, node_id: str) -> bool:
        result = await self.collection.delete_one({"_id": node_id})
        if result.deleted_count:
            log.info("stores.nodes.removed node=%s", node_id)
        return result.deleted_count == 1

    async def set_enabled(self, node_id: str, enabled: bool) -> bool:
        """False when there is no such node."""
        result = await self.collection.update_one({"_id": node_id}, {"$set": {"enabled": bool(enabled)}})
        if result.matched_count:
            log.info("stores.nodes.set_enabled node=%s enabled=%s", node_id, enabled)
        return result.matched_count == 1
