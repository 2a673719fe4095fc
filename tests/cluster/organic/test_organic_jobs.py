"""Organic jobs (issue 4, item 6) on real test nodes and the session's MongoDB: a user's
request runs on the chosen node, or on the fastest trusted node claiming a model with
fail-over, and every job is recorded, answered or not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.cli.main import build_parser
from cluster.cli.organic import run as cmd_job
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.honesty.verdicts import Outcome, Verdict
from cluster.organic.jobs import (
    NoNodeAvailable,
    OrganicJobs,
    OrganicRequest,
    rank_candidates,
)
from cluster.storage.connections import StoreConnections
from cluster.storage.mongo import ORGANIC_JOBS
from cluster.testing.testnode import NodeBehaviour, TestNode


@pytest.fixture(scope="module")
def servers(smollm2_dir: Path) -> Iterator[dict[str, str]]:
    behaviours = {"broken": NodeBehaviour(error_rate=1.0), "good": NodeBehaviour(),
                  "flagged": NodeBehaviour()}
    running = {name: TestNode(b, tokenizer_path=str(smollm2_dir)) for name, b in behaviours.items()}
    urls = {name: s.start_in_thread() for name, s in running.items()}
    yield urls
    for s in running.values():
        s.stop()


@pytest.fixture
def settings(fresh_settings: Settings, servers: dict[str, str]) -> Settings:
    settings = fresh_settings.model_copy(update={
        "requester": fresh_settings.requester.model_copy(update={"max_retries": 1,
                                                                "retry_backoff_s": 0.05})})

    async def register() -> None:
        conns = StoreConnections(settings)
        mongo = await conns.mongo()
        await mongo.ensure_indexes()
        # registration order = the order candidates without latency data are tried in
        for name in ("broken", "flagged", "good"):
            await mongo.nodes.add(Node(node_id=f"org-{name}", url=servers[name], model="smollm2",
                                       api="chat-completions"))
        await mongo.nodes.add(Node(node_id="org-other", url=servers["good"], model="other-model"))
        flagged = Verdict("org-flagged", "substitution", Outcome.FAIL,
                          "logprobs differ from the reference")
        await mongo.verdicts.record([flagged.to_record("round-1", 1.0)])
        await conns.close()

    asyncio.run(register())
    return settings


async def _jobs(settings: Settings) -> list[dict[str, Any]]:
    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        return await mongo.db[ORGANIC_JOBS].find({}).sort("created_at", 1).to_list(None)
    finally:
        await conns.close()


async def _run(settings: Settings, request: OrganicRequest) -> Any:
    conns = StoreConnections(settings)
    try:
        return await OrganicJobs(settings, await conns.mongo()).run(request)
    finally:
        await conns.close()


def test_a_job_on_a_chosen_node_is_answered_and_recorded(settings: Settings) -> None:
    result = asyncio.run(_run(settings, OrganicRequest(
        node_id="org-other", prompt="Say hello.", max_tokens=8, user="alice")))
    assert result.ok and result.node_id == "org-other" and result.answer
    (doc,) = asyncio.run(_jobs(settings))
    assert doc["_id"] == result.job_id and doc["state"] == "done" and doc["user"] == "alice"
    assert doc["answer"] == result.answer and doc["node_id"] == "org-other"
    assert doc["request"]["prompt"] == "Say hello." and len(doc["prompt_sha256"]) == 64
    assert doc["attempts"][0]["error_code"] == ErrorCode.OK
    # the node's own API was used: org-other speaks completions
    assert doc["request"]["api"] is None and doc["latency_s"] > 0


def test_a_model_job_skips_flagged_nodes_and_fails_over_to_the_next(settings: Settings) -> None:
    result = asyncio.run(_run(settings, OrganicRequest(model="smollm2", prompt="Hi there")))
    assert result.ok and result.node_id == "org-good", result
    assert [a.node_id for a in result.attempts] == ["org-broken", "org-good"]
    assert result.attempts[0].error_code == ErrorCode.NODE and result.attempts[0].status == 500
    assert "org-flagged" in result.skipped and "substitution" in result.skipped["org-flagged"]
    (doc,) = asyncio.run(_jobs(settings))
    assert doc["candidates"] == ["org-broken", "org-good"]
    assert [a["node_id"] for a in doc["attempts"]] == ["org-broken", "org-good"]


def test_a_failed_job_is_recorded_with_its_error(settings: Settings) -> None:
    result = asyncio.run(_run(settings, OrganicRequest(node_id="org-broken", prompt="x")))
    assert not result.ok and result.error_code == ErrorCode.NODE and result.error
    (doc,) = asyncio.run(_jobs(settings))
    assert doc["state"] == "failed" and doc["error_code"] == ErrorCode.NODE and doc["error"]


def test_jobs_nobody_can_take_get_clear_errors_and_record_nothing(settings: Settings) -> None:
    with pytest.raises(NoNodeAvailable, match="no node 'ghost' is registered"):
        asyncio.run(_run(settings, OrganicRequest(node_id="ghost", prompt="x")))
    with pytest.raises(NoNodeAvailable, match="no eligible node claims model 'gpt-9'.*none"):
        asyncio.run(_run(settings, OrganicRequest(model="gpt-9", prompt="x")))
    assert asyncio.run(_jobs(settings)) == []
    with pytest.raises(ValueError, match="exactly one of node_id"):
        OrganicRequest(node_id="a", model="b", prompt="x")
    with pytest.raises(ValueError, match="exactly one of node_id"):
        OrganicRequest(prompt="x")


def test_the_fastest_measured_node_goes_first() -> None:
    nodes = [Node(node_id=n, url="http://127.0.0.1:9", model="m") for n in ("a", "b", "c", "d")]
    nodes.append(Node(node_id="e", url="http://127.0.0.1:9", model="m", enabled=False))
    buffers = [{"node_id": "a", "latency_p50_s": 2.0}, {"node_id": "b", "latency_p50_s": 0.5},
               {"node_id": "b", "latency_p50_s": 0.7}, {"node_id": "c", "latency_p50_s": 0.1}]
    ranked, skipped = rank_candidates(nodes, "m", {"c": "identity signature: proxy"}, buffers)
    assert [n.node_id for n in ranked] == ["b", "a", "d"]
    assert skipped == {"c": "flagged: identity signature: proxy", "e": "disabled"}


def test_the_cli_runs_and_lists_jobs(settings: Settings, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    args = build_parser().parse_args(["job", "run", "--model", "smollm2", "--max-tokens", "8",
                                      "--user", "bob", "Tell me a joke."])
    assert cmd_job(settings, args) == 0
    out = capsys.readouterr().out
    assert out.startswith("# job ") and "on org-good (smollm2)" in out
    args = build_parser().parse_args(["job", "run", "--node", "org-broken", "x"])
    assert cmd_job(settings, args) == 1
    assert "failed (org-broken: NODE)" in capsys.readouterr().err
    args = build_parser().parse_args(["job", "list", "--json"])
    assert cmd_job(settings, args) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["state"] for d in listed] == ["failed", "done"] and listed[1]["user"] == "bob"


def test_scores_reads_the_honesty_state_in_one_pass(settings: Settings,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli.scores import run as cmd_scores

    assert cmd_scores(settings, build_parser().parse_args(["scores", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"scores", "verdicts", "signature_identity", "verification_traffic",
                        "unmeasurable", "groups", "paired"}
    assert [(v["node_id"], v["outcome"]) for v in out["verdicts"]] == [("org-flagged", "fail")]
    assert cmd_scores(settings, build_parser().parse_args(["scores"])) == 0
    text = capsys.readouterr().out
    assert "no scores yet" in text and "honesty verdicts" in text and "org-flagged" in text


def test_unverified_nodes_get_organic_jobs_only_when_the_operator_allows_it() -> None:
    nodes = [Node(node_id=n, url="http://127.0.0.1:9", model="m") for n in ("u", "t", "x")]
    buffers = [{"node_id": "u", "latency_p50_s": 0.1}, {"node_id": "t", "latency_p50_s": 0.9}]
    unverified = {"u": "identity: unknown: node did not answer"}
    ranked, skipped = rank_candidates(nodes, "m", {"x": "substitution: differs"}, buffers,
                                      unverified)
    assert [n.node_id for n in ranked] == ["t"]
    assert skipped["u"].startswith("unverified: identity") and "route_unverified" in skipped["u"]
    # allowed: after the trusted nodes, however fast it is; flagged nodes stay out
    ranked, skipped = rank_candidates(nodes, "m", {"x": "substitution: differs"}, buffers,
                                      unverified, allow_unverified=True)
    assert [n.node_id for n in ranked] == ["t", "u"] and set(skipped) == {"x"}
