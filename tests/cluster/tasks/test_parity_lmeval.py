"""Acceptance: the adapter scores a node exactly as lm-eval 0.4.13 does.

lm-eval's own ``simple_evaluate(model="local-completions", ...)`` runs the project's task
YAMLs against a real HTTP test node; the adapter builds the same docs' requests, POSTs them
to the same node with aiohttp and scores the answers. Per-doc metrics (doc by doc),
aggregates and stderrs must be identical.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node, Prompt, Relay, sample_key
from cluster.core.settings import PROJECT_ROOT
from cluster.tasks.lmeval import TaskAdapter, load_task_adapter
from cluster.testing import full_pass

pytestmark = pytest.mark.slow

DATASETS = PROJECT_ROOT / "datasets"
MODEL = "smollm2"
CONCURRENCY = 16


@pytest.fixture(scope="module")
def node_url(smollm2_dir: Path) -> Iterator[str]:
    from cluster.testing.testnode import NodeBehaviour, TestNode

    node = TestNode(NodeBehaviour(mode="correct"), tokenizer_path=smollm2_dir, model_name=MODEL)
    url = node.start_in_thread()
    try:
        yield url
    finally:
        node.stop()


def _rows(task: str) -> list[dict[str, Any]]:
    with open(DATASETS / task / "test.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def run_lm_eval(
    task: str, url: str, tokenizer: Path, *, limit: int | None, num_fewshot: int | None
) -> dict[str, Any]:
    return full_pass.run_lm_eval(task, url, MODEL, tokenizer, DATASETS, limit=limit,
                                 num_fewshot=num_fewshot, concurrency=CONCURRENCY)


async def _post_all(url: str, prompts: list[Prompt]) -> list[Relay]:
    sem = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=300)
    ) as session:

        async def post(p: Prompt) -> Relay:
            async with sem:
                started = time.time()
                async with session.post(url + p.path, json=p.body) as resp:
                    resp.raise_for_status()
                    body = await resp.json()
                return Relay(
                    prompt_id=p.prompt_id,
                    sample_key=p.sample_key,
                    node_id=p.node_id,
                    task=p.task,
                    doc_id=p.doc_id,
                    request_index=p.request_index,
                    error_code=ErrorCode.OK,
                    status=resp.status,
                    response=body,
                    started_at=started,
                    finished_at=time.time(),
                )

        return await asyncio.gather(*(post(p) for p in prompts))


def run_adapter(adapter: TaskAdapter, url: str, doc_ids: list[int]) -> dict[int, dict[str, float]]:
    node = Node(node_id="parity-node", url=url, model=MODEL)
    rows = _rows(adapter.name)
    prompts: list[Prompt] = []
    for doc_id in doc_ids:
        key = sample_key(node.node_id, adapter.name, doc_id, 0)
        prompts += adapter.build_prompts(node, doc_id, rows[doc_id], key, now=time.time())
    relays = asyncio.run(_post_all(url, prompts))
    by_doc: dict[int, list[Relay]] = {}
    for relay in relays:
        by_doc.setdefault(relay.doc_id, []).append(relay)
    return {d: adapter.score(d, rows[d], by_doc[d]) for d in doc_ids}


def assert_parity(
    adapter: TaskAdapter, results: dict[str, Any], ours: dict[int, dict[str, float]]
) -> None:
    theirs = full_pass.lm_eval_doc_metrics(results, adapter.name)
    assert sorted(theirs) == sorted(ours)
    mismatched = {d: (ours[d], theirs[d]) for d in theirs if ours[d] != theirs[d]}
    assert not mismatched, f"{len(mismatched)} docs differ, e.g. {list(mismatched.items())[:3]}"
    res = results["results"][adapter.name]
    for key in adapter.metric_names:
        metric, flt = key.split(",", 1)
        value, stderr = adapter.aggregate(key, [ours[d][key] for d in sorted(ours)])
        assert value == res[key], key
        lm_stderr = res[f"{metric}_stderr,{flt}"]
        assert stderr == (None if lm_stderr == "N/A" else lm_stderr), key


def test_gsm8k_50_docs_5_shot_score_exactly_as_lm_eval(node_url: str, smollm2_dir: Path) -> None:
    adapter = load_task_adapter("gsm8k", DATASETS, str(smollm2_dir), "completions", MODEL)
    limit = 50
    results = run_lm_eval("gsm8k", node_url, smollm2_dir, limit=limit, num_fewshot=5)
    # our docs in a scrambled order: prompts must not depend on it
    doc_ids = sorted(range(limit), key=lambda d: (d * 37) % limit)
    ours = run_adapter(adapter, node_url, doc_ids)
    assert_parity(adapter, results, ours)
    # the correct node answers gsm8k right
    strict = [m["exact_match,strict-match"] for m in ours.values()]
    assert adapter.aggregate("exact_match,strict-match", strict)[0] > 0.9


def test_openbookqa_all_500_docs_score_exactly_as_lm_eval(node_url: str, smollm2_dir: Path) -> None:
    adapter = load_task_adapter("openbookqa", DATASETS, str(smollm2_dir), "completions", MODEL)
    results = run_lm_eval("openbookqa", node_url, smollm2_dir, limit=None, num_fewshot=None)
    ours = run_adapter(adapter, node_url, list(range(adapter.n_docs)))
    assert len(ours) == 500
    assert_parity(adapter, results, ours)
    # the node's logprobs are pseudo-random: a mix of right and wrong picks, not a constant
    acc, _ = adapter.aggregate("acc,none", [m["acc,none"] for m in ours.values()])
    assert 0.0 < acc < 1.0
