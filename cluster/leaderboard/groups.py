"""A configured lm-eval group's score per node, derived from its subtasks' buffers.

The loop measures a group as its leaf tasks, each with a buffer of its own; a group's row
is lm-eval's group aggregate (:func:`~cluster.tasks.lmeval.aggregate_group`: size-weighted
or plain mean, pooled or unweighted stderr, as its ``aggregate_metric_list`` says) over the
leaves' buffer summaries, each buffer's ``n`` as its size. ``testbench scores`` and the
leaderboard show it with its subtasks folded under it (:func:`fold_groups`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cluster.tasks.lmeval import GroupPlan, aggregate_group


def _task_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    """A buffer summary as an lm-eval ``results`` entry (what the aggregate reads)."""
    entry: dict[str, Any] = {"sample_len": int(row.get("n", 0))}
    for key, m in (row.get("metrics") or {}).items():
        if not isinstance(m, Mapping) or "," not in key:
            continue
        metric, flt = key.split(",", 1)
        entry[key] = float(m["mean"])
        stderr = m.get("stderr")
        entry[f"{metric}_stderr,{flt}"] = "N/A" if stderr is None else float(stderr)
    return entry


def group_summaries(rows: Sequence[Mapping[str, Any]], groups: Sequence[GroupPlan]
                    ) -> list[dict[str, Any]]:
    """One row per (node, group) that has a buffer of any of the group's leaves, in the
    shape of a buffer summary (``metrics`` mean/stderr, ``n``, ``error_rate``) plus
    ``group: True`` and ``subtasks`` (its direct children)."""
    by_node: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        by_node.setdefault(str(row["node_id"]), {})[str(row["task"])] = row
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    every = [g for root in groups for g in (root, *root.subgroups())]
    for group in every:
        if group.name in seen:
            continue
        seen.add(group.name)
        leaves = [leaf.name for leaf in group.leaves()]
        for node_id, tasks in sorted(by_node.items()):
            present = {t: tasks[t] for t in leaves if t in tasks}
            if not present:
                continue
            entry = aggregate_group(group, {t: _task_entry(r) for t, r in present.items()})
            metrics = {}
            for key, value in entry.items():
                if "," in key and "_stderr," not in key:
                    metric, flt = key.split(",", 1)
                    stderr = entry.get(f"{metric}_stderr,{flt}")
                    metrics[key] = {"mean": float(value), "stderr": float(stderr)
                                    if isinstance(stderr, int | float) else None}
            n = sum(int(r.get("n", 0)) for r in present.values())
            errors = sum(float(r.get("error_rate", 0.0)) * int(r.get("n", 0))
                         for r in present.values())
            out.append({
                "node_id": node_id, "task": group.name, "group": True,
                "subtasks": group.child_names, "missing": [t for t in leaves if t not in tasks],
                "n": n, "n_ok": sum(int(r.get("n_ok", 0)) for r in present.values()),
                "error_rate": errors / n if n else 0.0, "errors_by_code": {},
                "metrics": metrics, "latency_p50_s": None, "latency_p95_s": None,
                "updated_at": max(float(r.get("updated_at", 0.0)) for r in present.values()),
            })
    return out


def fold_groups(rows: Sequence[Mapping[str, Any]], groups: Sequence[GroupPlan]
                ) -> list[dict[str, Any]]:
    """Buffer rows and group rows in display order: per node, each group's row followed by
    its children folded under it (``depth`` 1, 2, ...), then the tasks in no group."""
    group_rows = {(r["node_id"], r["task"]): r for r in group_summaries(rows, groups)}
    task_rows = {(str(r["node_id"]), str(r["task"])): r for r in rows}
    out: list[dict[str, Any]] = []
    for node_id in sorted({k[0] for k in task_rows} | {k[0] for k in group_rows}):
        placed: set[str] = set()
        stack: list[tuple[Any, int]] = [(root, 0) for root in reversed(groups)]
        while stack:
            item, depth = stack.pop()
            row = group_rows.get((node_id, item.name)) or task_rows.get((node_id, item.name))
            if row is None:
                continue
            placed.add(item.name)
            out.append({**row, "depth": depth})
            stack += [(child, depth + 1) for child in reversed(getattr(item, "children", ()))]
        for (nid, task), row in sorted(task_rows.items()):
            if nid == node_id and task not in placed:
                out.append({**row, "depth": 0})
    return out
