"""The leaderboard's data: nodes × tasks from the measuring loop's MongoDB.

- cells: each (node, task) buffer summary (``buffers`` collection, as ``testbench scores``
  reads it): every metric's mean ± stderr, n, error rate, p50/p95 latency, and its paired
  estimate against the trusted reference where that exists (``cluster/leaderboard/paired.py``);
- unmeasurable: the pairs the loop cannot measure as configured, with the reason
  (``BufferStore.unmeasurable``), shown in their table cells;
- verdicts: each node's latest verdict per check (the one stored verdict shape, from
  :class:`~cluster.storage.mongo.VerdictStore`): pass, fail, or unknown, which is shown as
  such and never as a pass; a streaming job's per-request findings are summarised by its
  ``streaming_job`` verdict and not listed one by one;
- series: each node's headline score per task over time, from the ``samples`` collection:
  after each counted sample, the mean of the last ``window`` counted samples (failed ones
  as 0), which is the score the node's buffer showed at that moment;
- groups: the configured lm-eval groups, each node's group score derived from its subtask
  buffers (``cluster/leaderboard/groups.py``), shown with the subtasks folded under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cluster.core.buffers import UnmeasurablePair
from cluster.core.errors import ErrorCode
from cluster.core.verdicts import DETAIL_CHECKS, Outcome, VerdictRecord
from cluster.leaderboard.groups import group_summaries
from cluster.leaderboard.paired import PairedRow, read_paired
from cluster.storage.mongo import MongoStores
from cluster.tasks.lmeval import GroupPlan
from serve_apps.evaluations import protocol as wire

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


def with_paired(cells: list[wire.LeaderboardCell], paired: Iterable[PairedRow]
                ) -> list[wire.LeaderboardCell]:
    """Cells with their paired estimates (labelled apart from the raw scores)."""
    by_pair = {(p.node_id, p.task): p for p in paired}
    out = []
    for cell in cells:
        row = by_pair.get((cell.node_id, cell.task))
        if row is not None:
            cell = cell.model_copy(update={"paired": {
                m: wire.PairedMetric(mean=s.mean, stderr=s.stderr, n=s.n,
                                     reference_mean=s.reference_mean,
                                     differing_docs=s.differing_docs)
                for m, s in row.metrics.items()}})
        out.append(cell)
    return out


_PASSED = {Outcome.PASS: True, Outcome.FAIL: False}


def verdict_of(record: VerdictRecord) -> wire.VerdictOut:
    """A stored verdict as the page shows it; ``passed`` is None for an unknown."""
    return wire.VerdictOut(kind=record.check.value, label=record.outcome.value,
                           passed=_PASSED.get(record.outcome), reason=record.reason,
                           at=record.ts)


def node_status(verdicts: Sequence[wire.VerdictOut]) -> str:
    """Flagged when a latest verdict failed, unverified when one is unknown (an unknown is
    never a pass), trusted when all passed, unchecked when there is none."""
    if any(v.passed is False for v in verdicts):
        return "flagged"
    if any(v.passed is None for v in verdicts):
        return "unverified"
    return "trusted" if verdicts else "unchecked"


def latest_verdicts(records: Iterable[VerdictRecord]) -> dict[str, list[wire.VerdictOut]]:
    """node id → its newest verdict per check (ordered by check)."""
    latest: dict[tuple[str, str], VerdictRecord] = {}
    for record in records:
        if record.check in DETAIL_CHECKS:
            continue
        key = (record.node_id, record.check.value)
        seen = latest.get(key)
        if seen is None or record.ts >= seen.ts:
            latest[key] = record
    out: dict[str, list[wire.VerdictOut]] = {}
    for (node_id, _), record in sorted(latest.items()):
        out.setdefault(node_id, []).append(verdict_of(record))
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


def unmeasurable_cells(pairs: Iterable[UnmeasurablePair]) -> list[wire.UnmeasurableCell]:
    return sorted((wire.UnmeasurableCell(node_id=p.node_id, task=p.task, reason=p.reason,
                                         since=p.since, attempts=p.attempts) for p in pairs),
                  key=lambda c: (c.node_id, c.task))


def build_leaderboard(
    summaries: Sequence[Mapping[str, Any]],
    node_models: Mapping[str, str],
    verdict_records: Iterable[VerdictRecord],
    sample_docs: Iterable[Mapping[str, Any]],
    window: int,
    now: float,
    unmeasurable: Iterable[UnmeasurablePair] = (),
    groups: Sequence[GroupPlan] = (),
    paired: Iterable[PairedRow] = (),
) -> wire.LeaderboardResponse:
    cells = with_paired(cells_from_summaries(summaries), paired)
    every = list({g.name: g for root in groups for g in (root, *root.subgroups())}.values())
    stuck = unmeasurable_cells(unmeasurable)
    verdicts = latest_verdicts(verdict_records)
    headlines: dict[str, str] = {}
    for cell in cells:
        if cell.metric is not None:
            headlines.setdefault(cell.task, cell.metric)
    node_ids = sorted({c.node_id for c in cells} | {c.node_id for c in stuck} | set(verdicts))
    return wire.LeaderboardResponse(
        generated_at=now,
        tasks=sorted({c.task for c in cells} | {c.task for c in stuck}),
        nodes=[wire.LeaderboardNode(node_id=n, model=node_models.get(n),
                                    verdicts=verdicts.get(n, []),
                                    status=node_status(verdicts.get(n, [])))
               for n in node_ids],
        cells=cells,
        series=score_series(sample_docs, headlines, window),
        unmeasurable=stuck,
        groups=[wire.LeaderboardGroup(group=g.name, subtasks=g.child_names,
                                      tasks=[leaf.name for leaf in g.leaves()]) for g in every],
        group_cells=cells_from_summaries(group_summaries(summaries, groups)),
    )


async def load_leaderboard(
    mongo: MongoStores, *, window: int, history_s: float, max_samples: int, now: float,
    groups: Sequence[GroupPlan] = (),
) -> wire.LeaderboardResponse:
    """Read the loop's stores and build the leaderboard (``groups``: the configured ones)."""
    summaries = await mongo.buffers.summaries()
    nodes = {n.node_id: n.model for n in await mongo.nodes.list()}
    verdicts = await mongo.verdicts.latest()
    sample_docs = await mongo.samples.history(now - history_s, max_samples)
    unmeasurable = await mongo.buffers.unmeasurable()
    paired = await read_paired(mongo)
    return build_leaderboard(summaries, nodes, verdicts, sample_docs, window, now, unmeasurable,
                             groups, paired)
