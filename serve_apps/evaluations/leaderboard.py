"""The leaderboard's data: nodes × tasks from the measuring loop's MongoDB.

- cells: each (node, task) buffer summary (``buffers`` collection, as ``testbench scores``
  reads it): every metric's mean ± stderr, n, error rate, p50/p95 latency;
- verdicts: the latest verdict of each kind per node (``verdicts`` collection, any kind:
  a document with ``node_id`` and ``kind`` and ``fraud``, ``passed`` or ``verdict``);
- series: each node's headline score per task over time, from the ``samples`` collection:
  after each counted sample, the mean of the last ``window`` counted samples (failed ones
  as 0), which is the score the node's buffer showed at that moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cluster.core.errors import ErrorCode
from cluster.storage.mongo import MongoStores
from serve_apps.evaluations import protocol as wire

VERDICTS = "verdicts"
MAX_POINTS = 120
# Preferred filters for the headline metric: lm-eval's plain one, then gsm8k's strict one.
_HEADLINE_FILTERS = ("none", "strict-match")
_COUNTED = [int(c) for c in ErrorCode if c.counts_against_node]


def headline_metric(names: Iterable[str]) -> str | None:
    """The metric a table cell shows: e.g. ``acc,none`` over ``acc_norm,none``."""
    ordered = sorted(names)
    for flt in _HEADLINE_FILTERS:
        for name in ordered:
            if name.split(",", 1)[-1] == flt:
                return name
    return ordered[0] if ordered else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def cells_from_summaries(summaries: Sequence[Mapping[str, Any]]) -> list[wire.LeaderboardCell]:
    cells = []
    for row in summaries:
        metrics = {
            name: wire.MetricScore(mean=float(m["mean"]), stderr=_float(m.get("stderr")))
            for name, m in (row.get("metrics") or {}).items()
            if isinstance(m, Mapping) and _float(m.get("mean")) is not None
        }
        headline = headline_metric(metrics)
        top = metrics.get(headline) if headline else None
        cells.append(wire.LeaderboardCell(
            node_id=str(row["node_id"]), task=str(row["task"]), metric=headline,
            mean=top.mean if top else None, stderr=top.stderr if top else None,
            metrics=metrics, n=int(row.get("n", 0)),
            error_rate=float(row.get("error_rate", 0.0)),
            latency_p50_s=_float(row.get("latency_p50_s")),
            latency_p95_s=_float(row.get("latency_p95_s")),
            updated_at=float(row.get("updated_at", 0.0)),
        ))
    return sorted(cells, key=lambda c: (c.node_id, c.task))


def verdict_of(doc: Mapping[str, Any]) -> wire.VerdictOut:
    """A verdict document of any kind, as pass / fail / its own word."""
    passed: bool | None = None
    if isinstance(doc.get("fraud"), bool | int):
        passed = not bool(doc["fraud"])
    elif isinstance(doc.get("passed"), bool | int):
        passed = bool(doc["passed"])
    word = doc.get("verdict") or doc.get("label")
    label = str(word) if isinstance(word, str) else (
        "pass" if passed else "fail" if passed is not None else "unknown"
    )
    at = next((_float(doc.get(k)) for k in ("validated_at", "created_at", "at")
               if _float(doc.get(k)) is not None), None)
    return wire.VerdictOut(kind=str(doc.get("kind") or "verdict"), label=label,
                           passed=passed, at=at)


def latest_verdicts(docs: Iterable[Mapping[str, Any]]) -> dict[str, list[wire.VerdictOut]]:
    latest: dict[tuple[str, str], wire.VerdictOut] = {}
    for doc in docs:
        if not isinstance(doc.get("node_id"), str):
            continue
        verdict = verdict_of(doc)
        key = (doc["node_id"], verdict.kind)
        seen = latest.get(key)
        if seen is None or (verdict.at or 0.0) >= (seen.at or 0.0):
            latest[key] = verdict
    out: dict[str, list[wire.VerdictOut]] = {}
    for (node_id, _), verdict in sorted(latest.items()):
        out.setdefault(node_id, []).append(verdict)
    return out


def _downsample(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    step = len(points) / (limit - 1)
    picked = [points[int(i * step)] for i in range(limit - 1)]
    return picked + [points[-1]]


def score_series(
    samples: Iterable[Mapping[str, Any]], headlines: Mapping[str, str], window: int
) -> list[wire.ScoreSeries]:
    """Rolling buffer score per (node, task), from sample documents in any order."""
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for doc in samples:
        task = doc.get("task")
        if task in headlines and doc.get("error_code") in _COUNTED:
            grouped.setdefault((str(doc["node_id"]), str(task)), []).append(doc)
    series = []
    for (node_id, task), docs in sorted(grouped.items()):
        docs.sort(key=lambda d: float(d.get("created_at", 0.0)))
        metric = headlines[task]
        values: list[float] = []
        points: list[tuple[float, float]] = []
        for doc in docs:
            ok = doc.get("error_code") == int(ErrorCode.OK)
            values.append(float((doc.get("metrics") or {}).get(metric, 0.0)) if ok else 0.0)
            recent = values[-window:]
            points.append((float(doc.get("created_at", 0.0)), sum(recent) / len(recent)))
        series.append(wire.ScoreSeries(node_id=node_id, task=task, metric=metric,
                                       window=window, points=_downsample(points, MAX_POINTS)))
    return series


def build_leaderboard(
    summaries: Sequence[Mapping[str, Any]],
    node_models: Mapping[str, str],
    verdict_docs: Iterable[Mapping[str, Any]],
    sample_docs: Iterable[Mapping[str, Any]],
    window: int,
    now: float,
) -> wire.LeaderboardResponse:
    cells = cells_from_summaries(summaries)
    verdicts = latest_verdicts(verdict_docs)
    headlines: dict[str, str] = {}
    for cell in cells:
        if cell.metric is not None:
            headlines.setdefault(cell.task, cell.metric)
    node_ids = sorted({c.node_id for c in cells} | set(verdicts))
    return wire.LeaderboardResponse(
        generated_at=now,
        tasks=sorted({c.task for c in cells}),
        nodes=[wire.LeaderboardNode(node_id=n, model=node_models.get(n),
                                    verdicts=verdicts.get(n, [])) for n in node_ids],
        cells=cells,
        series=score_series(sample_docs, headlines, window),
    )


async def load_leaderboard(
    mongo: MongoStores, *, window: int, history_s: float, max_samples: int, now: float
) -> wire.LeaderboardResponse:
    """Read the loop's collections and build the leaderboard."""
    summaries = await mongo.buffers.summaries()
    nodes = {n.node_id: n.model for n in await mongo.nodes.list()}
    verdict_docs = await mongo.collection(VERDICTS).find({}).to_list()
    sample_docs = await (
        mongo.samples.collection.find(
            {"created_at": {"$gt": float(now - history_s)}},
            {"node_id": 1, "task": 1, "created_at": 1, "error_code": 1, "metrics": 1},
        )
        .sort([("created_at", -1)])
        .limit(max_samples)
        .to_list()
    )
    return build_leaderboard(summaries, nodes, verdict_docs, sample_docs, window, now)
