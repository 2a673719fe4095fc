"""Acceptance: the API's results JSON holds lm-eval 0.4.13's own metric values.

lm-eval's ``simple_evaluate(model="local-completions", limit=20)`` runs the project's
openbookqa and gsm8k YAMLs against the test node, exactly as
tests/cluster/tasks/test_parity_lmeval.py runs it, while the evaluations app runs the same
tasks, endpoint and limit by ticket. Aggregates, stderrs, sample counts, n-shot, versions
and every doc's metrics must be identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from eval_app import EvalApp, wait_for

from cluster.core.settings import PROJECT_ROOT
from cluster.tasks.lmeval import task_config, task_manager
from cluster.testing.testnode import TestNode

pytestmark = pytest.mark.slow

DATASETS = PROJECT_ROOT / "datasets"
TASKS = ["openbookqa", "gsm8k"]
LIMIT = 20


def run_lm_eval(url: str, tokenizer: Path) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    model_args = (
        f"base_url={url}/v1/completions,model=smollm2,tokenizer={tokenizer},"
        "tokenizer_backend=huggingface,num_concurrent=8,max_retries=1"
    )
    results = simple_evaluate(
        model="local-completions", model_args=model_args,
        tasks=[task_config(t, DATASETS) for t in TASKS], task_manager=task_manager(DATASETS),
        limit=LIMIT, log_samples=True,
    )
    assert results is not None
    return results


def per_doc(samples: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, float]]:
    return {(s["doc_id"], s["filter"]): {m: float(s[m]) for m in s["metrics"]} for s in samples}


def test_api_results_equal_lm_evals_own_for_openbookqa_and_gsm8k(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path
) -> None:
    url = eval_nodes["fast"].base_url
    assert url is not None
    with eval_app.client("alice") as api:
        resp = api.post("/v1/evaluations", json={
            "endpoint": f"{url}/v1/completions", "model": "smollm2", "tasks": TASKS,
            "limit": LIMIT, "tokenizer": str(smollm2_dir),
        })
        assert resp.status_code == 202, resp.text
        run_id = resp.json()["id"]
        assert resp.headers["location"].endswith(f"/evaluations/v1/evaluations/{run_id}")
        theirs = run_lm_eval(url, smollm2_dir)  # meanwhile, the app runs ours
        status = wait_for(api, run_id, {"complete"})
        ours = api.get(f"/v1/evaluations/{run_id}/results", params={"samples": "true"}).json()

    assert [(p["task"], p["done"], p["total"], p["failed"]) for p in status["progress"]] == [
        (t, LIMIT, LIMIT, 0) for t in TASKS]
    for task in TASKS:
        assert ours["results"][task] == theirs["results"][task], task
        assert per_doc(ours["samples"][task]) == per_doc(theirs["samples"][task]), task
        for section in ("n-samples", "n-shot", "versions", "higher_is_better"):
            assert ours[section][task] == theirs[section][task], (section, task)
        for key in ("num_fewshot", "output_type", "generation_kwargs", "metric_list"):
            assert ours["configs"][task].get(key) == theirs["configs"][task].get(key), key
    assert ours["config"]["limit"] == LIMIT
    assert ours["config"]["model"] == "local-completions"
    # the correct test node answers gsm8k right; openbookqa is a mix (pseudo-random logprobs)
    assert ours["results"]["gsm8k"]["exact_match,strict-match"] == 1.0
    assert 0.0 < ours["results"]["openbookqa"]["acc,none"] < 1.0
