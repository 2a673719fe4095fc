"""Calibrate the honesty thresholds: run the cheater zoo (and optionally a real node) through
verification rounds and print, per node kind, the range of every statistic the verdicts
use next to its threshold, and how often each check flagged the kind.

Anchor: the thresholds in ``cluster.core.settings.HonestySettings`` (the honest kinds must stay
inside them with margin, every cheater must be outside in every round).

    .venv/bin/python bench/honesty_calibration.py [--reps 20] [--kinds honest,bf16,...]
        [--node NAME=URL ...]   # e.g. a vLLM node: --node vllm=http://127.0.0.1:8000/llm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from cluster.core.settings import PROJECT_ROOT, HonestySettings  # noqa: E402
from cluster.honesty.reference import (  # noqa: E402
    ServeReference,
    TransformersReference,
    TrustedReference,
)
from cluster.honesty.verdicts import Verdict  # noqa: E402
from cluster.honesty.verification import NodeTarget, Verifier  # noqa: E402
from cluster.testing.zoo import ZooProcess  # noqa: E402

STATS = (
    ("substitution", "mean_abs_logprob_diff", "max_mean_abs_logprob_diff"),
    ("substitution", "mean_regret", "max_mean_regret"),
    ("substitution", "reference_agreement", "min_reference_agreement"),
    ("substitution", "node_agreement", "min_node_agreement"),
    ("synthetic", "agree_share", "synthetic_min_share"),
    ("synthetic", "exact", None),
    ("identity", "text_share", "identity_match_share"),
    ("identity", "trace_share", None),
)


def node_args(values: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in values)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = HonestySettings()
    model_dir = PROJECT_ROOT / ".cache" / "models" / "smollm2"
    kinds = [k for k in args.kinds.split(",") if k]
    zoo_nodes = [("proxy@honest" if k == "proxy" else k) for k in kinds]
    if args.reference == "zoo":
        zoo_nodes.insert(0, "reference=honest")
    started = time.monotonic()
    with ZooProcess(zoo_nodes, model_dir, log_path=Path(args.log)) as zoo:
        zoo_s = time.monotonic() - started
        nodes = {k: v for k, v in zoo.urls.items() if k != "reference"}
        targets = [NodeTarget(name, url, "smollm2", seniority=i)
                   for i, (name, url) in enumerate({**nodes, **node_args(args.node)}.items())]
        per_kind: dict[str, list[Verdict]] = {t.node_id: [] for t in targets}
        round_s = []
        async with aiohttp.ClientSession() as http:
            reference: TrustedReference = (
                ServeReference("smollm2", zoo.urls["reference"], model_dir, http, seed=0)
                if args.reference == "zoo" else
                TransformersReference.load("smollm2", model_dir, threads=1))
            verifier = Verifier(settings, reference, http)
            for rep in range(args.reps):
                t0 = time.monotonic()
                report = await verifier.run_round(targets, args.seed_base + rep)
                round_s.append(time.monotonic() - t0)
                for v in report.verdicts:
                    per_kind[v.node_id].append(v)
                print(f"round {rep} seed={args.seed_base + rep} {round_s[-1]:.1f}s flagged="
                      f"{sorted({v.node_id for v in report.verdicts if v.flagged})}", flush=True)
    out: dict[str, Any] = {"zoo_start_s": zoo_s, "round_s": round_s, "kinds": {}}
    for kind, verdicts in per_kind.items():
        row: dict[str, Any] = {}
        for check, stat, limit in STATS:
            values = [v.evidence.get(stat) for v in verdicts if v.check == check]
            values = [float(x) for x in values if isinstance(x, int | float)]
            if values:
                row[stat] = {"min": min(values), "max": max(values),
                             "limit": getattr(settings, limit) if limit else None}
        flags: dict[str, int] = {}
        for v in verdicts:
            flags[v.check] = flags.get(v.check, 0) + int(v.flagged)
        row["flagged_rounds_by_check"] = flags
        rounds = {}
        for v in verdicts:
            rounds.setdefault(v.evidence.get("seed"), False)
            rounds[v.evidence.get("seed")] |= v.flagged
        row["rounds_flagged"] = sum(rounds.values())
        out["kinds"][kind] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seed-base", type=int, default=1000)
    parser.add_argument("--kinds", default="honest,perturbed,quantized,bf16,proxy,lazy,random")
    parser.add_argument("--reference", choices=["zoo", "local"], default="zoo",
                        help="zoo: an honest zoo node over HTTP; local: transformers in process")
    parser.add_argument("--node", action="append", default=[], metavar="NAME=URL")
    parser.add_argument("--log", default="/tmp/honesty_zoo.log")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    for kind, row in result["kinds"].items():
        print(f"\n== {kind}: flagged in {row['rounds_flagged']}/{args.reps} rounds; by check "
              f"{row['flagged_rounds_by_check']}")
        for stat, r in row.items():
            if isinstance(r, dict) and "min" in r:
                print(f"   {stat:24s} min={r['min']:.5f} max={r['max']:.5f} limit={r['limit']}")
    rs = result["round_s"]
    print(f"\nzoo start {result['zoo_start_s']:.1f}s; rounds: mean {sum(rs) / len(rs):.1f}s, "
          f"total {sum(rs):.1f}s")
    Path("/tmp/honesty_calibration.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
