"""The measuring loop end to end on a local Ray cluster with three test nodes.

correct: answers gsm8k right; wrong: answers wrongly; faulty: 500s, garbage JSON and
hangs on a share of requests. The loop must fill every buffer, score the nodes as they
deserve, record each failure with its code, and keep exactly one relay per prompt.
Killing each actor kind mid-run (and stopping the stores) is the fault-injection suite's
job: tests/actors/test_loop_faults.py, one loop hit by one fault after another.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.remote import MANAGER_NAME
from cluster.cli.loop import run_loop
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.honesty.verdicts import Outcome
from cluster.leaderboard.honesty import fetch_signature_findings
from cluster.storage.connections import StoreConnections
from cluster.testing.testnode import NodeBehaviour, TestNode

TARGET = 6

BEHAVIOURS = {
    "correct": NodeBehaviour(mode="correct"),
    "wrong": NodeBehaviour(mode="wrong"),
    "faulty": NodeBehaviour(mode="correct", error_rate=0.2, invalid_json_rate=0.1,
                            hang_rate=0.05, seed=3),
}


@pytest.fixture(scope="module")
def test_nodes(smollm2_dir: Path) -> Iterator[dict[str, Node]]:
    servers = []
    nodes = {}
    for name, behaviour in BEHAVIOURS.items():
        server = TestNode(behaviour, tokenizer_path=str(smollm2_dir))
        url = server.start_in_thread()
        servers.append(server)
        nodes[name] = Node(node_id=f"node-{name}", url=url, model="smollm2",
                           tokenizer=str(smollm2_dir))
    yield nodes
    for server in servers:
        server.stop()


def loop_settings(base: Settings) -> Settings:
    return base.model_copy(update={
        "manager": base.manager.model_copy(update={
            "target_samples": TARGET, "max_in_flight": 4, "tick_s": 0.5,
            "backoff_base_s": 0.5, "backoff_max_s": 2.0, "redrive_after_s": 20.0,
            "node_refresh_s": 0.0}),
        "requester": base.requester.model_copy(update={
            "sla": base.requester.sla.model_copy(update={"queue_s": 2.0})}),
    })


async def _register(settings: Settings, nodes: list[Node]) -> None:
    conns = StoreConnections(settings)
    mongo = await conns.mongo()
    await mongo.ensure_indexes()
    for node in nodes:
        await mongo.nodes.add(node)
    await conns.close()


async def _collect(settings: Settings) -> dict[str, Any]:
    conns = StoreConnections(settings)
    mongo = await conns.mongo()
    db = mongo.db
    out = {
        "prompts": await db["prompts"].find(
            {}, {"_id": 1, "sample_key": 1, "task": 1, "doc_id": 1}).to_list(None),
        "relays": await db["relays"].find({}, {"_id": 1, "error_code": 1}).to_list(None),
        "samples": await db["samples"].find({}).to_list(None),
        "buffers": await mongo.buffers.summaries(),
    }
    await conns.close()
    return out


def _kill_manager() -> None:
    try:
        ray.kill(ray.get_actor(MANAGER_NAME, namespace="testbench"), no_restart=True)
    except ValueError:
        pass


@pytest.fixture
def loop_env(fresh_settings: Settings, ray_session: None, test_nodes: dict[str, Node]
             ) -> Iterator[Settings]:
    _kill_manager()
    settings = loop_settings(fresh_settings)
    asyncio.run(_register(settings, list(test_nodes.values())))
    yield settings
    _kill_manager()


def _check_no_loss_no_duplicates(data: dict[str, Any]) -> None:
    prompt_ids = [p["_id"] for p in data["prompts"]]
    relay_ids = [r["_id"] for r in data["relays"]]
    assert len(prompt_ids) == len(set(prompt_ids))
    # every prompt has exactly one recorded relay, and no relay lacks its prompt
    assert sorted(relay_ids) == sorted(prompt_ids)
    sample_keys = {s["_id"] for s in data["samples"]}
    assert {p["sample_key"] for p in data["prompts"]} == sample_keys
    per_doc = collections.Counter((s["node_id"], s["task"], s["doc_id"]) for s in data["samples"])
    assert max(per_doc.values()) == 1, "a (node, task, doc) was sampled twice in the window"


def _check_signatures_first(settings: Settings, data: dict[str, Any]) -> None:
    """Benchmark tasks depend on the identity signature (the default dependency rule): no
    benchmark sample of a node exists before its signature buffer was full; signature samples
    carry their answer hashes, and `testbench scores` groups identical backends."""
    assert settings.tasks[0] == "signature"
    target = settings.manager.task_targets["signature"]
    for node in BEHAVIOURS:
        mine = [s for s in data["samples"] if s["node_id"] == f"node-{node}"]
        sig = sorted(s["created_at"] for s in mine if s["task"] == "signature")
        bench = [s["created_at"] for s in mine if s["task"] != "signature"]
        assert len(sig) >= target and bench
        assert min(bench) > sig[target - 1], f"node-{node} was benchmarked before its signature"
        ok = [s for s in mine if s["task"] == "signature" and s["error_code"] == ErrorCode.OK]
        assert ok and all(len(s["evidence"]["trace_sha256"]) == 64 for s in ok)
    # node-correct and node-faulty run one deterministic program in one mode: bit-identical
    # answers and logprobs, i.e. one backend under two names (the first registered holds the
    # identity); node-wrong's mode reports other logprobs: a backend of its own
    findings = asyncio.run(fetch_signature_findings(settings))
    assert findings["node-correct"].outcome == Outcome.PASS
    assert findings["node-faulty"].outcome == Outcome.FAIL, findings["node-faulty"]
    assert findings["node-faulty"].evidence["duplicate_of"] == "node-correct"
    assert findings["node-wrong"].outcome == Outcome.PASS
    assert findings["node-wrong"].reason == "unique identity"


def test_until_full_fills_every_buffer_and_scores_nodes(loop_env: Settings) -> None:
    t0 = time.monotonic()
    assert run_loop(loop_env, until_full=True, once=False, timeout_s=400)
    elapsed = time.monotonic() - t0
    data = asyncio.run(_collect(loop_env))
    buffers = {(b["node_id"], b["task"]): b for b in data["buffers"]}
    assert set(buffers) == {(f"node-{n}", t) for n in BEHAVIOURS for t in loop_env.tasks}
    for b in buffers.values():
        assert b["n"] >= TARGET, b
    correct = buffers[("node-correct", "gsm8k")]["metrics"]
    wrong = buffers[("node-wrong", "gsm8k")]["metrics"]
    assert correct["exact_match,strict-match"]["mean"] == 1.0
    assert wrong["exact_match,strict-match"]["mean"] == 0.0
    assert buffers[("node-correct", "gsm8k")]["error_rate"] == 0.0
    faulty = [buffers[("node-faulty", t)] for t in loop_env.tasks]
    assert any(b["errors_by_code"].get("node", 0) > 0 for b in faulty)
    failed = [s for s in data["samples"] if s["node_id"] == "node-faulty"
              and s["error_code"] == ErrorCode.NODE]
    assert failed and all(s["error"] for s in failed), "node failures carry their reason"
    _check_no_loss_no_duplicates(data)
    _check_signatures_first(loop_env, data)
    _check_request_builds_are_reported(data)
    _check_loop_yields_the_cpu()
    print(f"loop filled {len(buffers)} buffers of {TARGET} in {elapsed:.1f}s")


def _check_request_builds_are_reported(data: dict[str, Any]) -> None:
    """The Manager's status counts the docs whose lm-eval requests its process built (the
    Sampler draws there by default), with their CPU time: at least every benchmark doc
    the loop sent prompts for (read before the status), however many nodes got them."""
    manager = ray.get_actor(MANAGER_NAME, namespace="testbench")
    built = ray.get(manager.status.remote(detail=False), timeout=60)["requests_built"]
    sent = {(p["task"], p["doc_id"]) for p in data["prompts"] if p["task"] != "signature"}
    assert sent and len(sent) <= built["docs"], (len(sent), built)
    assert built["cpu_s"] > 0


def _check_loop_yields_the_cpu() -> None:
    """The loop's processes, every thread of them, run under ``ray.loop_cpu_policy``
    (default "idle"; the Manager's once its Sampler drew the first batch): a model served
    on the same machine is never preempted by them. The Requester, whose clock measures
    the nodes, keeps ``ray.requester_cpu_policy`` (default "normal"). By default
    (``pools`` 0) the Manager's process draws and scores: there is no Sampler or
    Evaluator process."""
    import psutil

    expected = {"ray::ManagerService": os.SCHED_IDLE, "ray::RequesterHost": os.SCHED_OTHER}
    titles = tuple(expected)
    seen: set[str] = set()
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        assert not title.startswith(("ray::SamplerProcess", "ray::EvaluatorProcess")), title
        kind = next((t for t in titles if title.startswith(t)), None)
        if kind is None:
            continue
        seen.add(kind)
        threads = [t.id for t in proc.threads()]
        assert len(threads) > 5, "Ray's own threads are there too"
        for tid in threads:
            try:
                assert os.sched_getscheduler(tid) == expected[kind], (title, tid)
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
    assert seen == set(titles), seen
