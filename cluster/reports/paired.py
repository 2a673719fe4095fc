"""Paired scores as a text table (``testbench scores``): per (node, task) and metric, the
raw buffer mean ± stderr beside the paired estimate ± its stderr."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cluster.leaderboard.paired import PairedRow

PAIRED_TITLE = ("paired scores (the trusted reference's full-task score + the node's mean "
                "per-doc difference from it; raw = the buffer's own mean):")


def _pm(mean: float, stderr: float | None) -> str:
    return f"{mean:.4f} ± {stderr:.4f}" if stderr is not None else f"{mean:.4f}"


def format_paired(rows: Sequence[PairedRow], raw: Sequence[Mapping[str, Any]]) -> str:
    """One line per (node, task, metric): raw and paired, docs paired and differing, and
    the reference's full-task score over its docs."""
    summaries = {(r["node_id"], r["task"]): r for r in raw}
    header = (f"{'node':<22} {'task':<16} {'metric':<22} {'raw mean ± stderr':>19} "
              f"{'paired ± stderr':>19} {'n':>4} {'differ':>6}  reference")
    lines = [header, "-" * len(header)]
    for row in sorted(rows, key=lambda r: (r.node_id, r.task)):
        summary = summaries.get((row.node_id, row.task), {})
        for i, (metric, score) in enumerate(sorted(row.metrics.items())):
            m = (summary.get("metrics") or {}).get(metric)
            raw_text = _pm(float(m["mean"]), m.get("stderr")) if m else "-"
            first = i == 0
            lines.append(
                f"{row.node_id if first else '':<22} {row.task if first else '':<16} "
                f"{metric:<22} {raw_text:>19} {_pm(score.mean, score.stderr):>19} "
                f"{score.n:>4} {score.differing_docs:>6}  "
                f"{score.reference_mean:.4f} over {row.reference_docs} docs")
    return "\n".join(lines)
