"""The registries as text: loaded task datasets and registered nodes."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.core.schemas import Node
from cluster.storage.postgres import RegistryEntry
from cluster.tasks.datasets import LoadResult


def format_registry(rows: Sequence[RegistryEntry]) -> str:
    if not rows:
        return "no datasets loaded: run `testbench datasets load`"
    return "\n".join(f"{r.task_name:<20} {r.n_docs:>7} docs  splits={r.splits}  "
                     f"sha256={r.sha256[:12]}" for r in rows)


def format_loads(results: Sequence[LoadResult]) -> str:
    return "\n".join(f"{r.task:<20} {'loaded' if r.loaded else 'unchanged':<9} {r.n_docs:>7} docs"
                     f"  sha256={r.sha256[:12]}" for r in results)


def format_nodes(nodes: Sequence[Node]) -> str:
    if not nodes:
        return "no nodes registered: `testbench nodes add ID URL --model NAME`"
    return "\n".join(f"{n.node_id:<20} {n.base_url:<32} {n.model:<24} {n.api:<17} "
                     f"{'enabled' if n.enabled else 'disabled'}" for n in nodes)
