"""One full pass of a task over chosen docs on one node, and lm-eval's own run as its anchor.

The measuring loop fills rolling buffers; a full pass (parity checks) measures a fixed set
of docs once, with the loop's own parts: the task adapter builds the requests,
:class:`cluster.nodes.requester.Requester` sends them (same limits, timeouts, retries and
error codes) and the adapter scores the answers. It skips the Manager, the Sampler and
Evaluator actors and the stores: ``bench/e2e_vs_lmeval.py`` times the loop itself
(``testbench run --until-full``) and reads its per-doc results with :func:`loop_doc_metrics`.

:func:`run_lm_eval` runs lm-eval 0.4.13's ``local-completions`` client with the project's
task YAMLs against the same endpoint, for a side-by-side comparison; run as a module, it is
that run in a process of its own, writing lm-eval's results (logged samples included) to a
JSON file::

    python -m cluster.testing.full_pass --task openbookqa --base-url http://127.0.0.1:8000/llm \\
        --model smollm2 --tokenizer .cache/models/smollm2 --output results.json [--limit N] \\
        [--concurrency 8] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node, Prompt, Relay, sample_key
from cluster.core.settings import EndpointAllowlist, RequesterSettings


@dataclass
class PassResult:
    per_doc: dict[int, dict[str, float]]
    failed: dict[int, str]
    n_requests: int
    wall_s: float


def read_rows(datasets_dir: Path, task: str, split: str = "test") -> list[dict[str, Any]]:
    """A shipped task's rows in file order (a doc's id is its row index)."""
    with open(Path(datasets_dir) / task / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


async def run_pass(
    adapter: Any,
    node: Node,
    docs: Mapping[int, dict[str, Any]],
    *,
    concurrency: int = 8,
    settings: RequesterSettings | None = None,
    epoch: int = 0,
) -> PassResult:
    """Measure ``docs`` on ``node`` once; every doc is scored or reported failed."""
    from cluster.nodes.requester import Requester

    base = settings or RequesterSettings()
    # The nodes of a pass are local test and Serve nodes: loopback is allowlisted explicitly.
    allowlist = base.endpoint_allowlist
    base = base.model_copy(update={"endpoint_allowlist": EndpointAllowlist(
        networks=[*allowlist.networks, *EndpointAllowlist.loopback().networks],
        hosts=allowlist.hosts)})
    settings = base.model_copy(update={
        "per_node_concurrency": concurrency,
        "global_concurrency": max(concurrency, base.global_concurrency),
    })
    started = time.perf_counter()
    prompts: list[Prompt] = []
    for doc_id, doc in docs.items():
        key = sample_key(node.node_id, adapter.name, doc_id, epoch)
        prompts += adapter.build_prompts(node, doc_id, doc, key, now=time.time())
    requester = Requester(settings)
    try:
        relays = await requester.relay(prompts, {node.node_id: node})
    finally:
        await requester.close()
    by_doc: dict[int, list[Relay]] = {}
    for relay in relays:
        by_doc.setdefault(relay.doc_id, []).append(relay)
    per_doc: dict[int, dict[str, float]] = {}
    failed: dict[int, str] = {}
    for doc_id, doc in docs.items():
        got = sorted(by_doc.get(doc_id, []), key=lambda r: r.request_index)
        bad = [r for r in got if r.error_code != ErrorCode.OK]
        if bad or not got:
            failed[doc_id] = "; ".join(f"{r.error_code.name}: {r.error}" for r in bad) or "no relay"
            continue
        per_doc[doc_id] = adapter.score(doc_id, doc, got)
    return PassResult(per_doc, failed, len(prompts), time.perf_counter() - started)


def run_lm_eval(
    task: str,
    base_url: str,
    model: str,
    tokenizer: str | Path,
    datasets_dir: Path,
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    concurrency: int = 8,
    extra_model_args: str = "",
) -> dict[str, Any]:
    """lm-eval's own ``simple_evaluate`` with ``local-completions`` on ``base_url`` (no /v1)."""
    from lm_eval import simple_evaluate

    from cluster.tasks.lmeval import task_config, task_manager

    model_args = (
        f"base_url={base_url}/v1/completions,model={model},tokenizer={tokenizer},"
        f"tokenizer_backend=huggingface,num_concurrent={concurrency},max_retries=1"
        + (f",{extra_model_args}" if extra_model_args else "")
    )
    results = simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=[task_config(task, datasets_dir)],
        task_manager=task_manager(datasets_dir),
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=True,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def lm_eval_doc_metrics(results: Mapping[str, Any], task: str) -> dict[int, dict[str, float]]:
    """lm-eval's logged samples as ``{doc_id: {"metric,filter": value}}``."""
    per_doc: dict[int, dict[str, float]] = {}
    for sample in results["samples"][task]:
        for metric in sample["metrics"]:
            per_doc.setdefault(sample["doc_id"], {})[f"{metric},{sample['filter']}"] = float(
                sample[metric]
            )
    return per_doc


def compare_doc_metrics(
    ours: Mapping[int, Mapping[str, float]], theirs: Mapping[int, Mapping[str, float]]
) -> dict[int, tuple[Mapping[str, float], Mapping[str, float] | None]]:
    """Docs whose metrics differ (or that only one side has)."""
    out: dict[int, tuple[Mapping[str, float], Mapping[str, float] | None]] = {}
    for doc_id in sorted(set(ours) | set(theirs)):
        a, b = ours.get(doc_id, {}), theirs.get(doc_id)
        if b is None or dict(a) != dict(b):
            out[doc_id] = (a, b)
    return out


@dataclass
class LoopSamples:
    """The loop's samples of one (node, task), as MongoDB's ``samples`` holds them."""

    per_doc: dict[int, dict[str, float]] = field(default_factory=dict)  # OK samples
    failed: dict[int, str] = field(default_factory=dict)  # doc -> "CODE: error"
    measured: dict[int, int] = field(default_factory=dict)  # doc -> samples of it


def loop_doc_metrics(samples: Iterable[Mapping[str, Any]]) -> LoopSamples:
    """Per-doc metrics from ``samples`` documents (fields ``doc_id``, ``error_code``,
    ``metrics``, ``error``): a doc with any failed sample is failed, never dropped."""
    out = LoopSamples()
    for row in samples:
        doc_id = int(row["doc_id"])
        out.measured[doc_id] = out.measured.get(doc_id, 0) + 1
        code = ErrorCode(row["error_code"])
        if code != ErrorCode.OK:
            out.failed[doc_id] = f"{code.name}: {row.get('error')}"
            out.per_doc.pop(doc_id, None)
        elif doc_id not in out.failed:
            out.per_doc[doc_id] = {k: float(v) for k, v in (row.get("metrics") or {}).items()}
    return out


def read_loop_samples(mongo_url: str, database: str, node_id: str, task: str) -> LoopSamples:
    """:func:`loop_doc_metrics` of the ``samples`` collection for ``(node_id, task)``."""
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(mongo_url)
    try:
        rows = client[database]["samples"].find(
            {"node_id": node_id, "task": task},
            {"doc_id": 1, "error_code": 1, "metrics": 1, "error": 1},
        )
        return loop_doc_metrics(list(rows))
    finally:
        client.close()


def aggregate(adapter: Any, per_doc: Mapping[int, Mapping[str, float]],
              metrics: Sequence[str] | None = None) -> dict[str, tuple[float, float | None]]:
    names = list(metrics or adapter.metric_names)
    return {m: adapter.aggregate(m, [per_doc[d][m] for d in sorted(per_doc)]) for m in names}


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's run (:func:`run_lm_eval`) in this process; its results go to ``--output``."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--base-url", required=True, help="the node's base URL (no /v1)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--datasets-dir", type=Path,
                    default=Path(__file__).resolve().parents[2] / "datasets")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=8, help="lm-eval's num_concurrent")
    ap.add_argument("--batch-size", type=int, default=1, help="lm-eval's batch_size")
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args(argv)
    from lm_eval.utils import handle_non_serializable

    results = run_lm_eval(args.task, args.base_url, args.model, args.tokenizer,
                          args.datasets_dir, limit=args.limit, num_fewshot=args.num_fewshot,
                          concurrency=args.concurrency,
                          extra_model_args=f"batch_size={args.batch_size}")
    args.output.write_text(json.dumps(results, default=handle_non_serializable),
                           encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
