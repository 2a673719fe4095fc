"""Which nodes the loop verifies next, and which streaming jobs it audits: plain decisions
over counters the Manager already reads, no I/O.

A node is **due** for a verification round when

- it has had no round in the window (a new node, or one whose rounds aged out): these
  come first, in registry order, since a node is verified before it is trusted; or
- its last round is at least ``min_round_gap_s`` old and one more round (costing what its
  rounds cost so far) keeps its verification traffic within ``max_traffic_share`` of its
  measuring traffic, in requests and in tokens (:func:`~cluster.honesty.traffic.verification_due`);
  the longest-unverified first.

At most ``max_nodes_per_round`` nodes per step. So after its first round, a node's
verification share stays at or under the budget by construction: a round is started only
where it fits. The first round is the one exception (4 requests against a node that may
not have been measured yet), which measuring traffic dilutes as the node's buffers fill.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cluster.core.settings import HonestySettings
from cluster.core.streaming import StreamingJob
from cluster.honesty.traffic import NodeTraffic, verification_due

DueReason = Literal["new", "budget"]


@dataclass(frozen=True)
class DueNode:
    node_id: str
    reason: DueReason


class VerificationScheduler:
    def __init__(self, settings: HonestySettings) -> None:
        self._settings = settings

    def due(self, node_ids: Sequence[str], ledger: Mapping[str, NodeTraffic], now: float
            ) -> list[DueNode]:
        """The nodes of ``node_ids`` (registry order) to verify now, new nodes first."""
        s = self._settings
        new: list[DueNode] = []
        waiting: list[tuple[float, int, DueNode]] = []
        for order, node_id in enumerate(node_ids):
            traffic = ledger.get(node_id)
            if traffic is None or traffic.rounds == 0 or traffic.last_round_at is None:
                new.append(DueNode(node_id, "new"))
                continue
            if now - traffic.last_round_at < s.min_round_gap_s:
                continue
            if verification_due(s, traffic.verification, traffic.measuring,
                                traffic.round_cost):
                waiting.append((traffic.last_round_at, order, DueNode(node_id, "budget")))
        waiting.sort(key=lambda t: (t[0], t[1]))
        return (new + [d for _, _, d in waiting])[: s.max_nodes_per_round]


def due_jobs(jobs: Sequence[StreamingJob], now: float, every_s: float) -> list[StreamingJob]:
    """Enabled jobs not audited within ``every_s``, never-audited first, then oldest."""
    if every_s <= 0:
        return []
    due = [j for j in jobs if j.enabled
           and (j.last_audited_at is None or now - j.last_audited_at >= every_s)]
    return sorted(due, key=lambda j: -math.inf if j.last_audited_at is None
                  else j.last_audited_at)
