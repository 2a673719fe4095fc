"""``make bench``: run every benchmark in ``bench/`` and write ``bench/RESULTS.md``.

Each bench runs as its own process (its full output goes to ``bench/logs/<name>.log`` and
to the terminal) and reports its headline figures as ``BENCH_RESULT`` lines: the figure,
the anchor it was measured against in the same run, the ratio and the goal. A bench that
fails is listed as failed; the others still run.

    .venv/bin/python bench/run_all.py [--only manager_plan.py poc.py]

``--only`` re-runs some benches and keeps the other rows of the existing RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_results import PREFIX

BENCH = Path(__file__).resolve().parent
# name -> extra arguments (the defaults are the issues' settings)
BENCHES: dict[str, list[str]] = {
    "manager_plan.py": [],
    "manager_plan.py --nodes 100000": ["--nodes", "100000", "--goal-s", "5", "--goal-gib", "10"],
    "requester.py": ["--rounds", "5"],
    "poc.py": [],
    "poc_power.py": [],
    "e2e_vs_lmeval.py": [],
    "sim_nodes.py": [],
    "honesty_calibration.py": [],
    "sometimes_rate.py": [],
    "paired_scores.py": ["--limit", "200"],
    "train.py": [],
}


def run(label: str, args: list[str]) -> tuple[int, list[dict], float]:
    script = label.split()[0]
    log_path = BENCH / "logs" / (label.replace(" ", "_").replace("--", "") + ".log")
    log_path.parent.mkdir(exist_ok=True)
    started = time.monotonic()
    results: list[dict] = []
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, str(BENCH / script), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=BENCH.parent)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith(PREFIX):
                results.append(json.loads(line[len(PREFIX):]))
            else:
                sys.stdout.write(line)
        code = proc.wait()
    return code, results, time.monotonic() - started


def _kept_rows(ran: set[str]) -> list[str]:
    """Rows of the existing RESULTS.md for benches not run this time (``--only``)."""
    path = BENCH / "RESULTS.md"
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            label = line.split("`")[1]
            if label in BENCHES and label not in ran:
                kept.append(line)
    return kept


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="bench labels to run (default: all)")
    args = ap.parse_args()
    rows: list[str] = []
    failed = []
    ran: set[str] = set()
    for label, extra in BENCHES.items():
        if args.only and label not in args.only and label.split()[0] not in args.only:
            continue
        ran.add(label)
        print(f"\n===== {label}", flush=True)
        code, results, wall = run(label, extra)
        if code != 0 or not results:
            failed.append(label)
            rows.append(f"| `{label}` | FAILED (exit {code}, see bench/logs) | | | | | |")
        for r in results:
            rows.append(f"| `{label}` | {r['figure']} | {r['value']} | {r['anchor']} | "
                        f"{r['ratio']} | {r['goal']} | {'yes' if r['met'] else '**no**'} |")
    header = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`bench/run_all.py`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},"
        f" {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}. Each"
        " ratio is against an anchor measured in the same run; full outputs in `bench/logs/`.",
        "",
        "| bench | figure | result | anchor | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    if args.only:
        rows = _kept_rows(ran) + rows
    (BENCH / "RESULTS.md").write_text("\n".join(header + rows) + "\n", encoding="utf-8")
    print("\n".join(["", *header[4:], *rows]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
