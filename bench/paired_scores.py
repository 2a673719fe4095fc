"""Paired scores against raw means: how many docs a node's openbookqa score needs for a 95%
confidence interval of ±2 points, measured on an honest node and on the int8 node, and how
well the paired estimate agrees with the node's full-task score.

The trusted reference (SmolLM2 in transformers, in this process, its own load) answers
every doc through the task adapter (``cluster/honesty/reference_docs.py``); each node
(``cluster.testing.zoo`` processes; ``--node NAME=URL`` adds a node of your own, e.g. the
Serve LLM app, judged as honest) answers the same docs as the loop sends them
(``cluster/testing/traffic.py``). Then, per node and metric:

- **raw**: docs for ±2 points = (1.96 · stdev of the per-doc values / 0.02)², the analytic
  interval of the buffer's mean (the node's per-doc stdev over all docs);
- **paired**: the smallest n for which, over ``--draws`` seeded random draws of n docs,
  95% of the paired estimates (reference full-task score + mean per-doc difference) have
  1.96 · paired stderr ≤ 0.02 *and* contain the node's full-task score; with the
  normal-approximation count from the per-doc differences' stdev beside it;
- **agreement**: |paired estimate − the node's full-task score| over the draws at that n
  and at 40 docs (``make run``'s openbookqa buffer).

Anchor: the raw mean, from the same per-doc values. Goal (honest node): ≤ 5 docs paired.

    .venv/bin/python bench/paired_scores.py [--limit 500] [--draws 400] [--node vllm=URL]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
from bench_results import report  # noqa: E402

from cluster.core.paired import Z_95, docs_for_half_width, paired_score  # noqa: E402
from cluster.core.schemas import Node  # noqa: E402
from cluster.core.settings import PROJECT_ROOT  # noqa: E402
from cluster.honesty.reference import TransformersReference  # noqa: E402
from cluster.testing.traffic import (  # noqa: E402
    adapter_for,
    measure_docs,
    read_rows,
    reference_for_docs,
)
from cluster.testing.zoo import ZooProcess  # noqa: E402

BENCH = "paired_scores.py"
MODEL = "smollm2"
TASK = "openbookqa"
HALF_WIDTH = 0.02
GOAL_HONEST_DOCS = 5
BUFFER_DOCS = 40
METRICS = ("acc,none", "acc_norm,none")


def paired_docs_needed(node: dict[int, float], ref: dict[int, float], ref_full: float,
                       node_full: float, draws: int, seed: int, max_n: int
                       ) -> tuple[int | None, float]:
    """The smallest n (2, 3, ... 10, then 10% steps) for which 95% of ``draws`` random
    draws of n docs give a paired interval of at most ±0.02; and at that n, the share of
    draws whose interval contains the node's full-task score."""
    rng = random.Random(seed)
    docs = sorted(node)
    n = 2
    while n <= max_n:
        narrow = covered = 0
        for _ in range(draws):
            picked = rng.sample(docs, n)
            score = paired_score({d: node[d] for d in picked}, ref, ref_full)
            assert score is not None and score.stderr is not None
            width = Z_95 * score.stderr
            narrow += width <= HALF_WIDTH
            covered += abs(score.mean - node_full) <= width + 1e-12
        if narrow >= 0.95 * draws:
            return n, covered / draws
        n = n + 1 if n < 10 else max(n + 1, int(n * 1.1))
    return None, 0.0


def agreement(node: dict[int, float], ref: dict[int, float], ref_full: float,
              node_full: float, n: int, draws: int, seed: int) -> tuple[float, float]:
    """Mean and 95th percentile of |paired estimate − node full-task score| over draws."""
    rng = random.Random(seed)
    docs = sorted(node)
    errors = []
    for _ in range(draws):
        picked = rng.sample(docs, min(n, len(docs)))
        score = paired_score({d: node[d] for d in picked}, ref, ref_full)
        assert score is not None
        errors.append(abs(score.mean - node_full))
    errors.sort()
    return sum(errors) / len(errors), errors[int(0.95 * (len(errors) - 1))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = PROJECT_ROOT / ".cache" / "models" / "smollm2"
    datasets_dir = PROJECT_ROOT / "datasets"
    rows = read_rows(datasets_dir, TASK)[: args.limit]
    docs = dict(enumerate(rows))
    log_dir = Path(args.log_dir)
    out: dict[str, Any] = {"nodes": {}}
    with ZooProcess(["honest", "quantized"], model_dir,
                    log_path=log_dir / "paired_scores_zoo.log") as zoo:
        reference = TransformersReference.load(MODEL, model_dir, threads=1)
        cpu = time.process_time()
        found, work, seconds = await reference_for_docs(reference, TASK, datasets_dir,
                                                         model_dir, docs)
        out["reference"] = {"seconds": seconds, "cpu_s": time.process_time() - cpu,
                            "tokens": work.tokens, "full": found.set.full}
        print(f"reference: {len(docs)} docs in {seconds:.1f} s ({work.tokens} tokens), "
              f"full-task {found.set.full}", flush=True)
        urls = {"honest (zoo, transformers)": zoo.urls["honest"],
                "int8 (zoo, quantized)": zoo.urls["quantized"],
                **{f"{k} (yours)": v for k, v in (n.split("=", 1) for n in args.node)}}
        async with aiohttp.ClientSession() as http:
            for label, url in urls.items():
                node = Node(node_id="n", url=url, model=MODEL, tokenizer=str(model_dir))
                started = time.monotonic()
                answered = await measure_docs(http, node, adapter_for(TASK, datasets_dir, node),
                                              docs, concurrency=4)
                print(f"{label}: {len(answered)} docs in {time.monotonic() - started:.1f} s",
                      flush=True)
                out["nodes"][label] = {m: analyse(answered, found, m, args) for m in METRICS}
    return out


def analyse(answered: dict[int, Any], found: Any, metric: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    node = {d: (t.metrics.get(metric, 0.0) if t.error_code == 0 else 0.0)
            for d, t in answered.items()}
    ref = {d: doc.metrics[metric] for d, doc in found.docs.items()}
    node_full = sum(node.values()) / len(node)
    ref_full = found.set.full[metric]
    diffs = [node[d] - ref[d] for d in node]
    raw_sd = statistics.stdev(node.values())
    diff_sd = statistics.stdev(diffs) if any(diffs) else 0.0
    needed, coverage = paired_docs_needed(node, ref, ref_full, node_full, args.draws, 1,
                                          len(node))
    n_agree = needed or BUFFER_DOCS
    return {
        "node_full": node_full, "reference_full": ref_full,
        "differing_docs": sum(1 for x in diffs if x), "raw_sd": raw_sd, "diff_sd": diff_sd,
        "raw_docs": docs_for_half_width(raw_sd, HALF_WIDTH),
        "paired_docs_formula": docs_for_half_width(diff_sd, HALF_WIDTH),
        "paired_docs": needed, "coverage": coverage,
        "agreement_at_needed": agreement(node, ref, ref_full, node_full, n_agree, args.draws, 2),
        "agreement_at_40": agreement(node, ref, ref_full, node_full, BUFFER_DOCS, args.draws, 3),
        "raw_halfwidth_at_40": Z_95 * raw_sd / math.sqrt(BUFFER_DOCS),
    }


def print_and_report(result: dict[str, Any], limit: int) -> None:
    print(f"\nopenbookqa, {limit} docs; 95% interval of ±{HALF_WIDTH * 100:.0f} points")
    header = (f"{'node':<28} {'metric':<14} {'full':>7} {'ref':>7} {'differ':>6} "
              f"{'raw docs':>8} {'paired':>6} {'(formula)':>9} {'covers':>6} "
              f"{'|paired-full| @n':>17} {'@40':>15}")
    print(header + "\n" + "-" * len(header))
    for label, metrics in result["nodes"].items():
        for metric, r in metrics.items():
            a_n, a_40 = r["agreement_at_needed"], r["agreement_at_40"]
            print(f"{label:<28} {metric:<14} {r['node_full']:>7.4f} {r['reference_full']:>7.4f} "
                  f"{r['differing_docs']:>6} {r['raw_docs']:>8} {str(r['paired_docs']):>6} "
                  f"{r['paired_docs_formula']:>9} {r['coverage']:>6.2f} {a_n[0]:>8.4f}/{a_n[1]:.4f} "
                  f"{a_40[0]:>7.4f}/{a_40[1]:.4f}")
    for label, metrics in result["nodes"].items():
        r = metrics["acc,none"]
        honest = label.startswith("honest") or label.endswith("(yours)")
        paired = r["paired_docs"]
        ratio = f"{r['raw_docs'] / paired:.0f}x fewer" if paired else "n/a"
        goal = f"<= {GOAL_HONEST_DOCS} docs paired" if honest else "paired < raw"
        met = (paired is not None and paired <= GOAL_HONEST_DOCS) if honest else \
            (paired is not None and paired < r["raw_docs"])
        report(BENCH, f"openbookqa acc, {label}: docs for a 95% interval of ±2 points, "
               f"paired ({limit} docs, {r['differing_docs']} differ from the reference)",
               f"{paired} docs", f"raw mean: {r['raw_docs']} docs", ratio, goal, met)
        a_mean, a_p95 = r["agreement_at_needed"]
        report(BENCH, f"openbookqa acc, {label}: abs(paired estimate - node's full-task score) "
               f"at {paired or BUFFER_DOCS} docs (mean / 95th percentile of draws)",
               f"{a_mean:.4f} / {a_p95:.4f}",
               f"node {r['node_full']:.4f}, reference {r['reference_full']:.4f}",
               f"raw ±{r['raw_halfwidth_at_40']:.3f} at 40 docs", "95th percentile <= 0.02",
               a_p95 <= HALF_WIDTH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="openbookqa docs (500: all)")
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--node", action="append", default=[], metavar="NAME=URL")
    parser.add_argument("--log-dir", default="/tmp")
    args = parser.parse_args()
    started = time.monotonic()
    result = asyncio.run(run(args))
    print_and_report(result, args.limit)
    ref = result["reference"]
    print(f"\nreference: {ref['seconds']:.1f} s, {ref['tokens']} tokens (validator cost, once "
          f"per task); bench {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
