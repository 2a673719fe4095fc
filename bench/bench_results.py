"""One machine-readable line per headline figure, so ``bench/run_all.py`` can build the
table in ``bench/RESULTS.md`` from what each bench measured in its own run."""

from __future__ import annotations

import json

PREFIX = "BENCH_RESULT "


def report(bench: str, figure: str, value: str, anchor: str, ratio: str, goal: str,
           met: bool) -> None:
    print(PREFIX + json.dumps({
        "bench": bench, "figure": figure, "value": value, "anchor": anchor, "ratio": ratio,
        "goal": goal, "met": met,
    }), flush=True)
