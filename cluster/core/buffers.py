"""A node's buffer for one task: the last N samples within the TTL, summarised.

Failed samples that count against the node (node or evaluation errors) stay in the
buffer: they raise the error rate and score 0 on every metric, so a node cannot improve
its score by failing the docs it would get wrong. Bench-side failures never get here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from cluster.core.errors import ErrorCode

Aggregator = Callable[[str, list[float]], tuple[float, float | None]]


class MetricSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: float
    stderr: float | None


class BufferSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node_id: str
    task: str
    n: int
    n_ok: int
    error_rate: float
    errors_by_code: dict[str, int]
    metrics: dict[str, MetricSummary]
    latency_p50_s: float | None
    latency_p95_s: float | None
    updated_at: float


class UnmeasurablePair(BaseModel):
    """A (node, task) the loop cannot measure as configured (its task adapter or dataset is
    unusable, e.g. a tokenizer that does not load): why, since when, and how many draws in
    a row failed for it. Kept beside the pair's buffer until the pair measures again."""

    model_config = ConfigDict(extra="forbid")
    node_id: str
    task: str
    reason: str
    since: float
    last_attempt_at: float
    attempts: int


def newest_rows(
    rows: Sequence[dict[str, Any]], since_ts: float, limit: int
) -> list[dict[str, Any]]:
    """The newest ``limit`` sample rows created after ``since_ts``, newest first, one per
    ``_id`` (the sample key); ties on ``created_at`` are broken by ``_id``, as the samples
    collection's query orders them."""
    unique = {row["_id"]: row for row in rows if row["created_at"] > since_ts}
    ordered = sorted(unique.values(), key=lambda r: (r["created_at"], r["_id"]), reverse=True)
    return ordered[:limit]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _default_aggregate(_metric: str, values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize_buffer(
    node_id: str,
    task: str,
    samples: Sequence[dict[str, Any]],
    metric_names: Sequence[str],
    now: float,
    aggregate: Aggregator | None = None,
) -> BufferSummary:
    """Summarise sample documents (as stored in MongoDB) that count against the node."""
    aggregate = aggregate or _default_aggregate
    counted = [s for s in samples if ErrorCode(s["error_code"]).counts_against_node]
    n = len(counted)
    ok = [s for s in counted if s["error_code"] == ErrorCode.OK]
    errors: dict[str, int] = {}
    for s in counted:
        if s["error_code"] != ErrorCode.OK:
            name = ErrorCode(s["error_code"]).name.lower()
            errors[name] = errors.get(name, 0) + 1
    metrics: dict[str, MetricSummary] = {}
    if n:
        for metric in metric_names:
            values = [float(s.get("metrics", {}).get(metric, 0.0)) for s in counted]
            mean, stderr = aggregate(metric, values)
            metrics[metric] = MetricSummary(mean=mean, stderr=stderr)
    latencies = [float(s["latency_s"]) for s in ok if s.get("latency_s") is not None]
    return BufferSummary(
        node_id=node_id,
        task=task,
        n=n,
        n_ok=len(ok),
        error_rate=(n - len(ok)) / n if n else 0.0,
        errors_by_code=errors,
        metrics=metrics,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        updated_at=now,
    )
