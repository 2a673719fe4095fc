"""Paired scores of every (node, task) buffer, next to the raw ones.

A buffer keeps the node's last N samples (doc id, error code, metrics); the trusted
reference's per-doc results of (the node's claimed model, the task) are in
``reference_sets`` / ``reference_docs`` (``cluster/honesty/reference_docs.py``). Computed
when read, so a set that completes after a buffer filled pairs with it at once.
``testbench scores``, ``/v1/leaderboard`` and the page show both, labelled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.core.paired import DEFAULT_PROMPTING, PairedScore, ReferenceSet, paired_scores
from cluster.core.schemas import Node
from cluster.storage.mongo import MongoStores


@dataclass(frozen=True)
class PairedRow:
    """One (node, task): per metric its paired estimate (raw scores stay in the buffer's
    summary), the reference set it was paired with, and that set's validator cost."""

    node_id: str
    task: str
    reference_set: str
    reference_docs: int
    reference_seconds: float
    metrics: dict[str, PairedScore] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "task": self.task, "reference_set": self.reference_set,
                "reference_docs": self.reference_docs,
                "reference_seconds": round(self.reference_seconds, 3),
                "metrics": {m: s.model_dump() for m, s in self.metrics.items()}}


def pairs_with_reference(node: Node) -> bool:
    """The reference answered the requests this node gets: completions, default prompting
    (``cluster/honesty/measuring.py::default_prompting`` says the same)."""
    return (node.api == "completions" and not node.apply_chat_template
            and node.system_instruction is None)


async def read_paired(mongo: MongoStores, nodes: Sequence[Node] | None = None
                      ) -> list[PairedRow]:
    """Every buffer that has a complete, current reference set to pair with."""
    registry = {n.node_id: n for n in (nodes if nodes is not None else await mongo.nodes.list())}
    buffers = await mongo.buffers.all()
    wanted = {(registry[b.node_id].model, b.task) for b in buffers
              if b.node_id in registry and pairs_with_reference(registry[b.node_id])}
    if not wanted:
        return []
    sets = await mongo.reference_sets.usable(sorted(wanted), DEFAULT_PROMPTING)
    docs_needed: dict[str, set[int]] = {}
    for buffer in buffers:
        node = registry.get(buffer.node_id)
        found = sets.get((node.model, buffer.task)) if node is not None else None
        if found is not None:
            docs_needed.setdefault(found.set_id, set()).update(e.doc_id for e in buffer.entries)
    docs = {set_id: await mongo.reference_docs.for_set(set_id, sorted(ids))
            for set_id, ids in docs_needed.items()}
    rows: list[PairedRow] = []
    for buffer in buffers:
        node = registry.get(buffer.node_id)
        found = sets.get((node.model, buffer.task)) if node is not None else None
        if found is None or not pairs_with_reference(node):  # type: ignore[arg-type]
            continue
        entries = [e.model_dump() for e in buffer.entries]
        scores = paired_scores(entries, found, docs[found.set_id])
        if scores:
            rows.append(paired_row(buffer.node_id, buffer.task, found, scores))
    return rows


def paired_row(node_id: str, task: str, found: ReferenceSet,
               scores: Mapping[str, PairedScore]) -> PairedRow:
    return PairedRow(node_id, task, found.set_id, found.n_docs, found.seconds, dict(scores))
