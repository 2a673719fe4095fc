"""The loop verifies and audits by itself: honesty rounds within each node's traffic budget,
receipt audits of a registered streaming job, evasion, and what the readers make of them.

Three fresh test nodes claim SmolLM2, whose trusted reference is the model itself, loaded
with transformers in the Auditor actor (``honesty.references`` with ``model_dir`` only):

- fresh: answers everything (a fake model, so the reference's checks fail it), and serves a
  streaming job through ``serve_apps/streaming`` (receipts signed with its key);
- evader: answers measuring traffic, 503s the round's batched probes;
- chat: a chat-only node, on which every check comes back unknown (unverified).

Nothing but ``testbench receipts register`` and the loop (``run_loop``, what ``testbench
run`` does) is run; then ``testbench scores``, the ``/v1/leaderboard`` builder, organic
routing, the traffic counters against the exact scan, and the Auditor's metrics endpoint
must all show what the loop did.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from honesty_servers import AppServer
from prometheus_client.parser import text_string_to_metric_families

from actors.remote import MANAGER_NAME
from cluster.auth.keys import Ed25519Key
from cluster.cli.loop import run_loop
from cluster.cli.main import build_parser
from cluster.cli.receipts import run as cmd_receipts
from cluster.cli.scores import run as cmd_scores
from cluster.core.schemas import Node
from cluster.core.settings import ReferenceSettings, Settings
from cluster.core.verdicts import Check, Outcome, VerdictRecord
from cluster.honesty.traffic import read_ledger, traffic_report
from cluster.organic.jobs import NoNodeAvailable, OrganicJobs, OrganicRequest
from cluster.storage.connections import StoreConnections
from cluster.testing.testnode import NodeBehaviour, TestNode
from serve_apps.evaluations.leaderboard import load_leaderboard
from serve_apps.streaming import StreamingJobConfig
from serve_apps.streaming.routes import create_api
from serve_apps.streaming.serving import StreamingServing

TARGET = 24  # 16 signature + 24 + 24 relays: room for the evader's second round at 10%
# Buffers refill every TTL, as they do over days in production: evasion is judged on measuring
# traffic sent after the probes began to fail, and the first round ends after the first fill.
TTL_S = 20.0
JOB = "job-fresh"
JOB_KEY = Ed25519Key(bytes([31]) * 32)
ROUND_CHECKS = ("tokenizer_signature", "config_signature", "identity", "synthetic",
                "substitution")


@pytest.fixture(scope="module")
def honesty_nodes(smollm2_dir: Path) -> Iterator[dict[str, Any]]:
    servers = {
        "fresh": TestNode(NodeBehaviour(mode="correct"), tokenizer_path=str(smollm2_dir)),
        "evader": TestNode(NodeBehaviour(mode="wrong", evade_probes=True),
                           tokenizer_path=str(smollm2_dir)),
        "chat": TestNode(NodeBehaviour(mode="correct"), tokenizer_path=str(smollm2_dir)),
    }
    urls = {name: s.start_in_thread() for name, s in servers.items()}
    job = StreamingJobConfig(job_id=JOB, upstream_url=urls["fresh"],
                             signing_key_hex=JOB_KEY.seed_hex)
    app = AppServer(create_api(StreamingServing(job, JOB_KEY), job.auth))
    nodes = {
        # registered as sampling seeded, which the test node cannot: its rounds include the
        # seeded sampled request, and its answers (no token ids) fail the replay check
        "fresh": Node(node_id="hn-fresh", url=urls["fresh"], model="smollm2",
                      tokenizer=str(smollm2_dir), seeded_sampling=True),
        "evader": Node(node_id="hn-evader", url=urls["evader"], model="smollm2",
                       tokenizer=str(smollm2_dir)),
        "chat": Node(node_id="hn-chat", url=urls["chat"], model="smollm2",
                     tokenizer=str(smollm2_dir), api="chat-completions",
                     tasks=["signature", "gsm8k"]),
    }
    yield {"nodes": nodes, "job_url": app.start()}
    app.stop()
    for server in servers.values():
        server.stop()


def _kill_manager() -> None:
    try:
        ray.kill(ray.get_actor(MANAGER_NAME, namespace="testbench"), no_restart=True)
    except ValueError:
        pass


def honesty_settings(base: Settings, model_dir: Path) -> Settings:
    return base.model_copy(update={
        "manager": base.manager.model_copy(update={
            "target_samples": TARGET, "max_in_flight": 8, "tick_s": 0.5, "sample_ttl_s": TTL_S,
            "node_refresh_s": 0.0, "backoff_base_s": 0.5, "backoff_max_s": 2.0}),
        "honesty": base.honesty.model_copy(update={
            "references": {"smollm2": ReferenceSettings(model_dir=model_dir)},
            "verify_every_s": 1.0, "min_round_gap_s": 2.0, "evasion_rounds": 2,
            "evasion_min_relays": 5, "identity_prompts": 2, "synthetic_prompts": 2,
            "canary_prompts": 2, "max_tokens": 8, "request_timeout_s": 30.0,
            # rounds and audits only (the reference's per-doc results and the traffic
            # check have their own loop test, tests/actors/test_loop_paired.py)
            "reference_docs_every_s": 0.0, "traffic_check_every_s": 0.0}),
        # the job's upstream is a test node, which cannot sample seeded: no sampled audits
        "receipts": base.receipts.model_copy(update={
            "rerun_fraction": 1.0, "audit_requests": 2, "audit_sampled_requests": 0}),
    })


async def _register(settings: Settings, nodes: list[Node]) -> None:
    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        await mongo.ensure_indexes()
        for node in nodes:
            await mongo.nodes.add(node)
    finally:
        await conns.close()


async def _verdicts(settings: Settings) -> list[VerdictRecord]:
    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        return [r for n in ("hn-fresh", "hn-evader", "hn-chat")
                for r in await mongo.verdicts.for_node(n)]
    finally:
        await conns.close()


def _latest(records: list[VerdictRecord]) -> dict[tuple[str, str], VerdictRecord]:
    return {(r.node_id, r.check.value): r for r in records}


def _done(records: list[VerdictRecord]) -> bool:
    latest = _latest(records)
    return (all(("hn-fresh", c) in latest for c in ROUND_CHECKS)
            and ("hn-fresh", "streaming_job") in latest
            and ("hn-chat", "identity") in latest
            and latest.get(("hn-evader", "evasion")) is not None
            and latest[("hn-evader", "evasion")].outcome is Outcome.FAIL)


def _auditor_verdict_counts(worker_id: str) -> Counter[tuple[str, str]]:
    """``ray_testbench_verdicts_total`` of one worker, by (check, outcome)."""
    out: Counter[tuple[str, str]] = Counter()
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "ray_testbench_verdicts_total"
                        and sample.labels.get("WorkerId") == worker_id):
                    out[(sample.labels["check"], sample.labels["outcome"])] += int(sample.value)
    return out


@pytest.fixture
def honesty_env(fresh_settings: Settings, ray_session: None, smollm2_dir: Path,
                honesty_nodes: dict[str, Any]) -> Iterator[tuple[Settings, dict[str, Any]]]:
    _kill_manager()
    settings = honesty_settings(fresh_settings, smollm2_dir)
    asyncio.run(_register(settings, list(honesty_nodes["nodes"].values())))
    yield settings, honesty_nodes
    _kill_manager()


def test_the_loop_verifies_audits_and_flags_without_any_command(
        honesty_env: tuple[Settings, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    settings, env = honesty_env
    t0 = time.monotonic()
    # the one command: the job's owner registers it (its key read from the app's /job)
    args = build_parser().parse_args(["receipts", "register", JOB, "--node", "hn-fresh",
                                      "--url", env["job_url"]])
    assert cmd_receipts(settings, args) == 0
    assert "registered streaming job job-fresh" in capsys.readouterr().out
    assert run_loop(settings, until_full=True, once=False, timeout_s=300)
    filled = time.monotonic() - t0
    deadline = time.monotonic() + 180
    records = asyncio.run(_verdicts(settings))
    while not _done(records) and time.monotonic() < deadline:
        time.sleep(1.0)
        records = asyncio.run(_verdicts(settings))
    assert _done(records), "\n".join(sorted(f"{r.node_id} {r.check.value} {r.outcome.value} "
                                             f"{r.reason}" for r in records))
    latest = _latest(records)

    # rounds: the fresh node was verified (the fake model fails the reference's checks)
    assert latest[("hn-fresh", "substitution")].outcome is Outcome.FAIL
    assert latest[("hn-fresh", "evasion")].outcome is Outcome.PASS
    sampled = latest[("hn-fresh", "seeded_sampling")]
    assert sampled.outcome is Outcome.FAIL and "token_ids" in sampled.reason, sampled.reason
    assert sampled.evidence["traffic"]["requests"] == 1
    assert ("hn-evader", "seeded_sampling") not in latest  # not registered as seeded
    # the receipt audit: receipts valid, the re-runs on the reference differ
    audit = latest[("hn-fresh", "streaming_job")]
    assert audit.evidence["receipts_valid"] == 2 and audit.evidence["receipts_refused"] == 0
    assert audit.evidence["rerun"] == 2 and audit.outcome is Outcome.FAIL
    # the chat-only node: every check unknown, nothing failed
    chat = {c: r.outcome for (n, c), r in latest.items() if n == "hn-chat"}
    assert set(chat) == set(ROUND_CHECKS) and set(chat.values()) == {Outcome.UNKNOWN}
    # the evader: unanswered probes twice while its measuring traffic was answered
    evasion = latest[("hn-evader", "evasion")]
    assert evasion.evidence["unanswered_rounds"] == 2 and "evading" in evasion.reason
    assert evasion.evidence["measuring_ok"] >= 5

    manager = ray.get_actor(MANAGER_NAME, namespace="testbench")
    status = ray.get(manager.status.remote(detail=True))["honesty"]
    assert status["rounds"] >= 2 and status["audits"] >= 1 and not status["over_budget"]

    async def read() -> tuple[Any, Any, Any, Any]:
        conns = StoreConnections(settings)
        try:
            mongo = await conns.mongo()
            since = 0.0  # the counters keep whole days: compare all of it
            ids = [n.node_id for n in env["nodes"].values()]
            board = await load_leaderboard(mongo, window=10, history_s=3600, max_samples=5000,
                                           now=time.time())
            return (await read_ledger(mongo, since), await traffic_report(mongo, ids, since),
                    board, await mongo.streaming_jobs.get(JOB))
        finally:
            await conns.close()

    def agree(counters: Any, exact: Any) -> bool:
        return all(counters[r.node_id].measuring == r.measuring for r in exact)

    # the counters are written every honesty.traffic_flush_s: they agree with the exact
    # scan within a few intervals (the loop goes on refilling buffers meanwhile)
    counters, exact, board, job = asyncio.run(read())
    deadline = time.monotonic() + 10 * max(settings.honesty.traffic_flush_s, 1.0)
    while not agree(counters, exact) and time.monotonic() < deadline:
        time.sleep(0.5)
        counters, exact, board, job = asyncio.run(read())
    # the budget: the fresh node's verification within 10% of its measuring traffic, and
    # the counters the Manager weighs are the exact scan of prompts, relays and verdicts
    for report in exact:
        mine = counters[report.node_id]
        assert mine.measuring.requests == report.measuring.requests
        assert mine.measuring.prompt_tokens == report.measuring.prompt_tokens
        assert mine.measuring.completion_tokens == report.measuring.completion_tokens
        assert mine.verification.requests == pytest.approx(report.verification.requests, abs=1e-3)
        assert mine.verification.tokens == report.verification.tokens
    fresh = counters["hn-fresh"]
    assert fresh.rounds >= 1 and fresh.request_share is not None and fresh.token_share is not None
    assert fresh.request_share <= settings.honesty.max_traffic_share
    assert fresh.token_share <= settings.honesty.max_traffic_share
    shares = {n: (round(t.request_share or 0, 4), round(t.token_share or 0, 4), t.rounds,
                  t.verification.requests, t.measuring.requests) for n, t in counters.items()}
    assert job is not None and job.last_audited_at is not None

    # `testbench scores` shows the loop's verdicts, the audit's and the traffic shares
    assert cmd_scores(settings, build_parser().parse_args(["scores", "--json"])) == 0
    scores = json.loads(capsys.readouterr().out)
    shown = {(v["node_id"], v["check"]): v["outcome"] for v in scores["verdicts"]}
    assert shown[("hn-fresh", "substitution")] == "fail"
    assert shown[("hn-fresh", "streaming_job")] == "fail"
    assert shown[("hn-evader", "evasion")] == "fail"
    assert shown[("hn-chat", "identity")] == "unknown"
    traffic = {t["node_id"]: t for t in scores["verification_traffic"]}
    assert traffic["hn-fresh"]["request_share"] <= settings.honesty.max_traffic_share
    assert cmd_scores(settings, build_parser().parse_args(["scores"])) == 0
    text = capsys.readouterr().out
    assert any(line.startswith("hn-chat") and "unverified" in line for line in text.splitlines())
    # /v1/leaderboard: the same verdicts, unknown as unknown (never a pass)
    on_board = {(n.node_id, v.kind): v for n in board.nodes for v in n.verdicts}
    assert on_board[("hn-fresh", "streaming_job")].label == "fail"
    assert on_board[("hn-evader", "evasion")].passed is False
    assert on_board[("hn-chat", "substitution")].label == "unknown"
    assert on_board[("hn-chat", "substitution")].passed is None
    assert {n.node_id: n.status for n in board.nodes} == {
        "hn-fresh": "flagged", "hn-evader": "flagged", "hn-chat": "unverified"}

    # organic routing: the unverified node gets no job by default, and gets it when allowed
    async def organic(allow: bool) -> Any:
        cfg = settings.model_copy(update={"honesty": settings.honesty.model_copy(
            update={"route_unverified": allow})})
        conns = StoreConnections(cfg)
        try:
            return await OrganicJobs(cfg, await conns.mongo()).run(
                OrganicRequest(model="smollm2", prompt="Say hi.", max_tokens=4))
        finally:
            await conns.close()

    with pytest.raises(NoNodeAvailable, match="hn-chat: unverified") as refused:
        asyncio.run(organic(False))
    assert "hn-evader: flagged: evasion" in str(refused.value)
    routed = asyncio.run(organic(True))
    assert routed.ok and routed.node_id == "hn-chat"

    # the verdicts metric of the Auditor's worker counts exactly what it wrote
    children = ray.get(manager.children.remote())
    worker = ray.get(children["auditor"].__ray_call__.remote(
        lambda _self: ray.get_runtime_context().get_worker_id()))
    deadline = time.monotonic() + 45
    while True:
        written = Counter((r.check.value, r.outcome.value)
                          for r in asyncio.run(_verdicts(settings)))
        exported = _auditor_verdict_counts(worker)
        if exported == written or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert exported == written
    assert written[(Check.EVASION.value, "fail")] >= 1 and written[("substitution", "fail")] >= 1
    print(f"loop filled in {filled:.1f}s, all verdicts after {time.monotonic() - t0:.1f}s; "
          f"shares (requests, tokens, rounds, verification req, measuring req): {shares}; "
          f"verdicts exported {dict(exported)}")
