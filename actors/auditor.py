"""Auditor: the loop's honesty stage. Runs the verification rounds, receipt audits, the
reference's per-doc results and the traffic check the Manager schedules
(``actors/scheduled_checks.py``), each recorded as ``testbench verify``
and ``testbench receipts audit`` record theirs, and counts every verdict it writes in
``ray_testbench_verdicts_total`` (check, outcome).

It is a child of its own because the trusted reference may be a model loaded in process
(``TransformersReference``): seconds to load and CPU-heavy to run, which must not stall the
Manager's ticks. References are built on first use, so a loop with nothing to verify never
loads one.

Two sessions: the nodes' one obeys the endpoint policy with the Requester's allowlist
(``requester.endpoint_allowlist``, ``cluster/nodes/policy.py``) for every connection the
rounds and audits make; the references' one does not (a reference is the operator's own
server, often on loopback).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from actors import metrics
from cluster.auth.peers import RequestSigner
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.core.streaming import StreamingJob
from cluster.core.verdicts import VerdictRecord
from cluster.honesty.job_audits import audit_job
from cluster.honesty.measuring import Rescorer, check_traffic
from cluster.honesty.reference import TrustedReference
from cluster.honesty.reference_docs import refresh_reference_docs
from cluster.honesty.verdicts import VerdictSink
from cluster.honesty.verification import build_references, verify_nodes
from cluster.nodes.policy import EndpointGuard
from cluster.nodes.transport import open_node_session
from cluster.storage.connections import StoreConnections

log = logging.getLogger(__name__)


class MeteredVerdicts:
    """A verdict sink that counts what it writes, by check and outcome (``actors/metrics.py``)."""

    def __init__(self, inner: VerdictSink) -> None:
        self._inner = inner

    async def record(self, verdicts: Sequence[VerdictRecord]) -> int:
        n = await self._inner.record(verdicts)
        for (check, outcome), count in Counter(
                (v.check.value, v.outcome.value) for v in verdicts).items():
            metrics.record_verdict(check, outcome, count)
        return n


class Auditor:
    def __init__(self, settings: Settings, stores: StoreConnections | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._own_stores = stores is None
        self._stores = stores or StoreConnections(settings)
        self._clock = clock
        self._guard = EndpointGuard.of(settings.requester.endpoint_allowlist)
        self._http: aiohttp.ClientSession | None = None  # the nodes', guarded
        self._reference_http: aiohttp.ClientSession | None = None  # the references'
        self._references: dict[str, TrustedReference] | None = None
        self._lock: asyncio.Lock | None = None
        # the traffic check's re-scores, kept across steps, and the secret that picks the
        # relays to re-score (nodes cannot know which of their answers are checked)
        self._rescorers: dict[str, Rescorer] = {}
        self._salt = secrets.token_hex(16)

    def _open(self, guard: EndpointGuard | None) -> aiohttp.ClientSession:
        signer = RequestSigner.from_settings(self._settings.auth)
        return open_node_session(
            middlewares=(signer.aiohttp_middleware,) if signer is not None else (), guard=guard)

    def _session(self) -> aiohttp.ClientSession:
        """The nodes' session: every connection obeys the endpoint policy."""
        if self._http is None or self._http.closed:
            self._http = self._open(self._guard)
        return self._http

    def _reference_session(self) -> aiohttp.ClientSession:
        """The references' session (trusted servers: no endpoint policy)."""
        if self._reference_http is None or self._reference_http.closed:
            self._reference_http = self._open(None)
        return self._reference_http

    async def references(self) -> Mapping[str, TrustedReference]:
        """The configured references, built once (a model in process loads in a thread)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._references is None:
                started = time.perf_counter()
                self._references = await asyncio.to_thread(
                    build_references, self._settings.honesty, self._reference_session())
                log.info("auditor.references_ready models=%s seconds=%.1f",
                         ",".join(self._references) or "-", time.perf_counter() - started)
        return self._references

    async def verify(self, nodes: Sequence[Node]) -> dict[str, Any]:
        """One round over ``nodes`` (registry order), recorded; a summary for the Manager."""
        started = time.perf_counter()
        mongo = await self._stores.mongo()
        done = await verify_nodes(self._settings.honesty, mongo, list(nodes),
                                  await self.references(), http=self._session(),
                                  guard=self._guard, sink=MeteredVerdicts(mongo.verdicts), clock=self._clock)
        outcomes = Counter((v.check, v.outcome.value) for v in done.verdicts)
        outcomes.update((v.check.value, v.outcome.value) for v in done.evasion)
        return {
            "nodes": [n.node_id for n in nodes], "finished_at": done.finished_at,
            "seconds": round(time.perf_counter() - started, 3),
            "verdicts": [{"check": c, "outcome": o, "n": n}
                         for (c, o), n in sorted(outcomes.items())],
            "flagged": sorted({v.node_id for v in done.verdicts if v.flagged}
                              | {r.node_id for r in done.evasion if r.flagged}),
            "traffic": {node: t.as_dict() for node, t in done.traffic.items()},
        }

    async def reference_docs(self) -> dict[str, Any]:
        """One step of the reference's per-doc results (``cluster/honesty/reference_docs.py``):
        where each (model, task) set stands."""
        mongo = await self._stores.mongo()
        datasets = await self._stores.datasets()
        return await refresh_reference_docs(self._settings, mongo, datasets,
                                            await self.references(), clock=self._clock)

    async def check_traffic(self, nodes: Sequence[Node]) -> dict[str, Any]:
        """The traffic check over ``nodes`` (``cluster/honesty/measuring.py``), its verdicts
        recorded and counted; per node its outcome and the validator's cost."""
        mongo = await self._stores.mongo()
        return await check_traffic(self._settings, mongo, list(nodes), await self.references(),
                                   self._rescorers, salt=self._salt,
                                   sink=MeteredVerdicts(mongo.verdicts), clock=self._clock)

    async def audit(self, jobs: Sequence[StreamingJob]) -> dict[str, Any]:
        """Audit each job (fresh requests through its app); a summary for the Manager."""
        mongo = await self._stores.mongo()
        references = await self.references()
        sink = MeteredVerdicts(mongo.verdicts)
        out: dict[str, Any] = {}
        for job in jobs:
            try:
                report = await audit_job(self._settings, mongo, job, references, self._session(),
                                         guard=self._guard, sink=sink, clock=self._clock)
            except Exception as exc:  # one job's failure must not stop the others' audits
                log.warning("auditor.audit_failed job=%s", job.job_id, exc_info=True)
                out[job.job_id] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            out[job.job_id] = {"node_id": job.node_id, "outcome": report.outcome.value,
                               "exchanges": report.exchanges,
                               "receipts_valid": report.receipts_valid,
                               "receipts_refused": report.receipts_refused,
                               "rerun": report.rerun, "mismatches": report.mismatches}
        return out

    async def close(self) -> None:
        for http in (self._http, self._reference_http):
            if http is not None:
                await http.close()
        if self._own_stores:
            await self._stores.close()
