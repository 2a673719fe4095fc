"""The Manager's scheduled honesty steps: verification rounds within each node's traffic
budget, and receipt audits of the registered streaming jobs.

Each step is a plain decision (``cluster/honesty/schedule.py``) over what the Manager
already holds or reads in one query, and the work goes to the Auditor child
(``actors/auditor.py``) through the Pipeline, one call in flight per step:

- **verification**, every ``honesty.verify_every_s`` while references are configured: read
  every node's traffic counters for the buffer TTL window (one query,
  ``cluster/storage/mongo/traffic.py``), pick the due nodes (never-verified first, then
  those a round keeps within ``honesty.max_traffic_share``), and have them verified in one
  round. The per-node shares it weighed are in :meth:`ScheduledChecks.status`.
- **receipt audits**, looking every ``manager.node_refresh_s`` (at most every
  ``receipts.audit_every_s``): the enabled jobs not audited for ``receipts.audit_every_s``
  are audited (``cluster/honesty/job_audits.py``).
- **reference results**, every ``honesty.reference_docs_every_s`` while references are
  configured: the next ``honesty.reference_docs_chunk`` docs of the trusted reference's
  per-doc results of each (model, task), until every set is complete and current
  (``cluster/honesty/reference_docs.py``).
- **traffic check**, every ``honesty.traffic_check_every_s`` while references are
  configured: every LLM node's measuring traffic of the TTL window against the reference
  (``cluster/honesty/measuring.py``), one ``traffic_substitution`` verdict per node.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.core.streaming import StreamingJob
from cluster.honesty.schedule import VerificationScheduler, due_jobs
from cluster.honesty.traffic import NodeTraffic, read_ledger
from cluster.storage.connections import StoreConnections

log = logging.getLogger(__name__)


class HonestyChildren(Protocol):
    """What the steps need from the Manager's Pipeline."""

    def verify(self, nodes: Sequence[Node]) -> Awaitable[dict[str, Any]]: ...
    def audit(self, jobs: Sequence[StreamingJob]) -> Awaitable[dict[str, Any]]: ...
    def reference_docs(self) -> Awaitable[dict[str, Any]]: ...
    def check_traffic(self, nodes: Sequence[Node]) -> Awaitable[dict[str, Any]]: ...


Spawn = Callable[[Coroutine[Any, Any, None]], None]


class ScheduledChecks:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self._honesty = settings.honesty
        self._receipts = settings.receipts
        self._window_s = settings.manager.sample_ttl_s
        self._audit_look_s = min(settings.receipts.audit_every_s,
                                 settings.manager.node_refresh_s)
        self._clock = clock
        self._scheduler = VerificationScheduler(settings.honesty)
        self._next_verify = -math.inf
        self._next_audit = -math.inf
        self._verifying = False
        self._auditing = False
        self._next_reference = -math.inf
        self._next_traffic = -math.inf
        self._referencing = False
        self._checking_traffic = False
        self._ledger: dict[str, NodeTraffic] = {}
        self._last_round: dict[str, Any] | None = None
        self._last_audit: dict[str, Any] | None = None
        self._reference_sets: dict[str, Any] = {}
        self._last_traffic: dict[str, Any] | None = None
        self._counters = {"rounds": 0, "nodes_verified": 0, "audits": 0, "jobs_audited": 0,
                          "reference_steps": 0, "traffic_checks": 0, "step_errors": 0}

    @property
    def verifying(self) -> bool:
        return bool(self._honesty.references) and self._honesty.verify_every_s > 0

    @property
    def auditing(self) -> bool:
        return self._receipts.audit_every_s > 0

    @property
    def referencing(self) -> bool:
        return bool(self._honesty.references) and self._honesty.reference_docs_every_s > 0

    @property
    def checking_traffic(self) -> bool:
        return bool(self._honesty.references) and self._honesty.traffic_check_every_s > 0

    def tick(self, now: float, nodes: Mapping[str, Node], children: HonestyChildren,
             stores: StoreConnections, spawn: Spawn) -> None:
        """Start the steps that are due (each runs as its own task, one at a time)."""
        if self.verifying and not self._verifying and now >= self._next_verify:
            self._verifying = True
            self._next_verify = now + self._honesty.verify_every_s
            llm = [n for n in nodes.values() if n.kind == "llm"]
            spawn(self._verify(now, llm, children, stores))
        if self.auditing and not self._auditing and now >= self._next_audit:
            self._auditing = True
            self._next_audit = now + self._audit_look_s
            spawn(self._audit(now, children, stores))
        if self.referencing and not self._referencing and now >= self._next_reference:
            self._referencing = True
            self._next_reference = now + self._honesty.reference_docs_every_s
            spawn(self._reference_docs(children))
        if self.checking_traffic and not self._checking_traffic and now >= self._next_traffic:
            self._checking_traffic = True
            self._next_traffic = now + self._honesty.traffic_check_every_s
            spawn(self._traffic([n for n in nodes.values() if n.kind == "llm"], children))

    async def _reference_docs(self, children: HonestyChildren) -> None:
        try:
            report = await children.reference_docs()
            self._counters["reference_steps"] += 1
            self._reference_sets = report
            # sets still filling: look again soon, not a whole period later
            if any(isinstance(r, dict) and r.get("complete") is False for r in report.values()):
                self._next_reference = min(self._next_reference, self._clock() + 1.0)
        except Exception:
            self._counters["step_errors"] += 1
            log.warning("manager.reference_docs_step_failed", exc_info=True)
        finally:
            self._referencing = False

    async def _traffic(self, nodes: list[Node], children: HonestyChildren) -> None:
        try:
            if nodes:
                report = await children.check_traffic(nodes)
                self._counters["traffic_checks"] += 1
                self._last_traffic = {"at": self._clock(), "nodes": report}
        except Exception:
            self._counters["step_errors"] += 1
            log.warning("manager.traffic_check_step_failed", exc_info=True)
        finally:
            self._checking_traffic = False

    async def _verify(self, now: float, nodes: list[Node], children: HonestyChildren,
                      stores: StoreConnections) -> None:
        try:
            mongo = await stores.mongo()
            self._ledger = await read_ledger(mongo, now - self._window_s)
            due = self._scheduler.due([n.node_id for n in nodes], self._ledger, now)
            if not due:
                return
            picked = {d.node_id for d in due}
            log.info("manager.verification_due nodes=%d new=%d", len(due),
                     sum(d.reason == "new" for d in due))
            summary = await children.verify([n for n in nodes if n.node_id in picked])
            self._counters["rounds"] += 1
            self._counters["nodes_verified"] += len(summary.get("nodes", []))
            self._last_round = {**summary, "due": {d.node_id: d.reason for d in due}}
            self._ledger = await read_ledger(mongo, self._clock() - self._window_s)
        except Exception:
            self._counters["step_errors"] += 1
            log.warning("manager.verification_step_failed", exc_info=True)
        finally:
            self._verifying = False

    async def _audit(self, now: float, children: HonestyChildren,
                     stores: StoreConnections) -> None:
        try:
            mongo = await stores.mongo()
            jobs = due_jobs(await mongo.streaming_jobs.list(enabled_only=True), now,
                            self._receipts.audit_every_s)
            if not jobs:
                return
            summary = await children.audit(jobs)
            self._counters["audits"] += 1
            self._counters["jobs_audited"] += len(summary)
            self._last_audit = {"at": self._clock(), "jobs": summary}
        except Exception:
            self._counters["step_errors"] += 1
            log.warning("manager.receipt_audit_step_failed", exc_info=True)
        finally:
            self._auditing = False

    def status(self, detail: bool = True) -> dict[str, Any]:
        """Counters, the last round and audit, and per node (with ``detail``) its
        verification against measuring traffic as the last step weighed it."""
        budget = self._honesty.max_traffic_share
        over = sorted(node for node, t in self._ledger.items()
                      if t.rounds > 1 and _over(t, budget))
        out: dict[str, Any] = {
            "verifying": self.verifying, "auditing": self.auditing,
            "max_traffic_share": budget, **self._counters,
            "over_budget": over, "last_round": self._last_round, "last_audit": self._last_audit,
            "reference_sets": self._reference_sets, "last_traffic_check": self._last_traffic,
        }
        if detail:
            out["nodes"] = {node: {
                "rounds": t.rounds, "last_round_at": t.last_round_at,
                "verification": t.verification.as_dict(), "measuring": t.measuring.as_dict(),
                "request_share": t.request_share, "token_share": t.token_share,
            } for node, t in sorted(self._ledger.items())}
        return out


def _over(t: NodeTraffic, budget: float) -> bool:
    """Over budget in requests or tokens (a node never measured counts as over, one that
    was sent nothing, e.g. for want of a reference, does not)."""
    if not t.verification.requests and not t.verification.tokens:
        return False
    shares = (t.request_share, t.token_share)
    return any(s is None or s > budget for s in shares)
