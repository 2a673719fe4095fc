"""The measuring loop's Ray metrics, defined here and nowhere else.

Recorded through ``ray.util.metrics`` and exported by each Ray node's metrics agent on its
Prometheus endpoint (``ray.nodes()[i]["MetricsExportPort"]``), where Ray prefixes every
name with ``ray_`` and counters get ``_total``:

| series | kind | labels | recorded by |
|---|---|---|---|
| ``ray_testbench_relays_total`` | counter | node_id, error_code | Requester |
| ``ray_testbench_relay_latency_seconds`` | histogram | error_code | Requester |
| ``ray_testbench_requester_prompts_pending`` | gauge | | Requester |
| ``ray_testbench_requester_requests_in_flight`` | gauge | | Requester |
| ``ray_testbench_samples_total`` | counter | node_id, task, error_code | Evaluator |
| ``ray_testbench_manager_samples_in_flight`` | gauge | | Manager |
| ``ray_testbench_manager_samples_planned`` | gauge | | Manager |
| ``ray_testbench_manager_samples_redriven`` | gauge | | Manager |
| ``ray_testbench_verdicts_total`` | counter | check, outcome | Auditor (every verdict it writes) |

``error_code`` is the lower-case name of :class:`~cluster.core.errors.ErrorCode` (``ok``,
``node``, ...). Latency has no ``node_id`` label: a histogram per node multiplies the series
by the bucket count at thousands of nodes; per-node latency is in the buffers (p50/p95).

Every function here is a no-op unless Ray is initialised in this process, and Ray is never
imported by this module: the domain classes that call it stay usable in plain unit tests
and benches, and cost nothing there. The metric objects are created on first use, once
per process (each Ray worker exports its own series, labelled with its ``WorkerId``).

Ray drops a gauge that was not set during the last couple of report intervals, so the
queue gauges here keep their last value and a daemon thread sets it again every
``GAUGE_REFRESH_S``: a queue that stopped moving still shows its depth.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Relay, Sample

# Relay latencies span loopback answers (ms) to SLA timeouts (up to 120 s by default).
LATENCY_BUCKETS_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]

PREFIX = "testbench_"
# Well under Ray's default report interval (10 s), after which an unset gauge ages out.
GAUGE_REFRESH_S = 2.5


class _RayGauge(Protocol):
    def set(self, value: float | None, tags: dict[str, str] | None = None) -> None: ...


class StickyGauge:
    """A Ray gauge that remembers its value, so that it can be set again periodically."""

    def __init__(self, gauge: _RayGauge) -> None:
        self._gauge = gauge
        self._value: float | None = None

    def set(self, value: float) -> None:
        self._value = value
        self._gauge.set(value)

    def refresh(self) -> None:
        if self._value is not None:
            self._gauge.set(self._value)


class LoopMetrics:
    """The metric objects of one process. Build it only where Ray is initialised."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Gauge, Histogram

        def gauge(name: str, description: str) -> StickyGauge:
            return StickyGauge(Gauge(PREFIX + name, description))

        self.relays = RayCounter(
            PREFIX + "relays", "relays produced (one per prompt sent), by node and error code",
            tag_keys=("node_id", "error_code"),
        )
        self.relay_latency = Histogram(
            PREFIX + "relay_latency_seconds",
            "time from sending a prompt to the end of the node's answer (final attempt)",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("error_code",),
        )
        self.requester_pending = gauge(
            "requester_prompts_pending",
            "prompts inside Requester.relay calls: waiting for a slot or in flight",
        )
        self.requester_in_flight = gauge(
            "requester_requests_in_flight", "HTTP requests open to nodes"
        )
        self.samples = RayCounter(
            PREFIX + "samples", "samples written (replays not counted), by node, task, code",
            tag_keys=("node_id", "task", "error_code"),
        )
        self.manager_in_flight = gauge(
            "manager_samples_in_flight",
            "samples the Manager is driving through sampler, requester and evaluator",
        )
        self.manager_planned = gauge(
            "manager_samples_planned", "docs planned by the Manager's last tick"
        )
        self.manager_redriven = gauge(
            "manager_samples_redriven",
            "samples left pending in MongoDB that the last sweep re-drove",
        )
        self.verdicts = RayCounter(
            PREFIX + "verdicts", "honesty verdicts, by check and outcome",
            tag_keys=("check", "outcome"),
        )
        self._gauges = [self.requester_pending, self.requester_in_flight,
                        self.manager_in_flight, self.manager_planned, self.manager_redriven]
        threading.Thread(target=self._refresh_forever, name="testbench-metrics",
                         daemon=True).start()

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            for g in self._gauges:
                g.refresh()


_metrics: LoopMetrics | None = None
_lock = threading.Lock()


def loop_metrics() -> LoopMetrics | None:
    """This process's metrics, or None where Ray is not initialised (nothing to export to).

    ``sys.modules`` rather than ``import ray``: a process that never imported Ray has no
    cluster to report to, and importing Ray here would slow every plain unit test.
    """
    global _metrics
    if _metrics is not None:
        return _metrics
    ray: Any = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    with _lock:
        if _metrics is None:
            _metrics = LoopMetrics()
    return _metrics


def code_label(code: ErrorCode | int) -> str:
    return ErrorCode(code).name.lower()


def record_relays(relays: Iterable[Relay]) -> None:
    """Count relays by (node, code) and observe their latencies; one call per batch."""
    m = loop_metrics()
    if m is None:
        return
    by_key: Counter[tuple[str, str]] = Counter()
    for relay in relays:
        code = code_label(relay.error_code)
        by_key[(relay.node_id, code)] += 1
        if relay.latency_s is not None:
            m.relay_latency.observe(relay.latency_s, tags={"error_code": code})
    # One increment per (node, code) group rather than per relay: the Requester is the hot path.
    for (node_id, code), n in by_key.items():
        m.relays.inc(n, tags={"node_id": node_id, "error_code": code})


def set_requester_queue(pending: int, in_flight: int) -> None:
    m = loop_metrics()
    if m is None:
        return
    m.requester_pending.set(pending)
    m.requester_in_flight.set(in_flight)


def record_samples(samples: Iterable[Sample]) -> None:
    """Count newly written samples by (node, task, code)."""
    m = loop_metrics()
    if m is None:
        return
    by_key = Counter((s.node_id, s.task, code_label(s.error_code)) for s in samples)
    for (node_id, task, code), n in by_key.items():
        m.samples.inc(n, tags={"node_id": node_id, "task": task, "error_code": code})


def set_manager_queue(in_flight: int, planned: int | None = None,
                      redriven: int | None = None) -> None:
    """The Manager's queue depths; ``None`` leaves a gauge as it was."""
    m = loop_metrics()
    if m is None:
        return
    m.manager_in_flight.set(in_flight)
    if planned is not None:
        m.manager_planned.set(planned)
    if redriven is not None:
        m.manager_redriven.set(redriven)


def record_verdict(check: str, outcome: str, n: int = 1) -> None:
    """Count ``n`` verdicts of ``check`` (e.g. ``"identity"``) with ``outcome`` (``"pass"``,
    ``"fail"``, ``"unknown"``). The loop's Auditor calls it for every verdict it writes
    (``actors/auditor.py::MeteredVerdicts``): rounds, evasion and receipt audits."""
    m = loop_metrics()
    if m is None or n <= 0:
        return
    m.verdicts.inc(n, tags={"check": check, "outcome": outcome})
