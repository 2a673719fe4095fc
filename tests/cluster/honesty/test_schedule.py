"""The loop's honesty decisions without the loop: which nodes are due for a round within the
traffic budget (new ones first), which streaming jobs are due for an audit, when unanswered
probes are evasion, and the traffic counters they are weighed with (nx-27017)."""

from __future__ import annotations

import time

import pytest

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Prompt, Relay
from cluster.core.settings import HonestySettings
from cluster.core.streaming import StreamingJob
from cluster.core.verdicts import Outcome
from cluster.honesty.evasion import judge_evasion, judge_round_evasion
from cluster.honesty.schedule import VerificationScheduler, due_jobs
from cluster.honesty.traffic import (
    NodeTraffic,
    measuring_counts,
    read_ledger,
    record_measuring,
    record_round_traffic,
)
from cluster.honesty.verdicts import PROBES_KEY, Traffic, Verdict
from cluster.storage.mongo import MongoStores

SETTINGS = HonestySettings(max_traffic_share=0.1, min_round_gap_s=100.0, max_nodes_per_round=3,
                           evasion_rounds=2, evasion_min_relays=5, evasion_min_ok_share=0.8)
ROUND = Traffic(4, 300, 100)


def ledger(node: str, rounds: int, last: float, measuring: Traffic) -> NodeTraffic:
    total = Traffic(ROUND.requests * rounds, ROUND.prompt_tokens * rounds,
                    ROUND.completion_tokens * rounds)
    return NodeTraffic(node, total, measuring, rounds=rounds, last_round_at=last)


def test_new_nodes_come_first_and_others_only_within_the_budget() -> None:
    now = 10_000.0
    rich = Traffic(200, 100_000, 10_000)  # room for 5 rounds by requests
    counters = {
        "measured-a": ledger("measured-a", 1, now - 500, rich),
        "recent": ledger("recent", 1, now - 50, rich),  # inside min_round_gap_s
        "spent": ledger("spent", 5, now - 900, rich),  # a 6th round would be 12%
        "measured-b": ledger("measured-b", 1, now - 800, rich),
    }
    due = VerificationScheduler(SETTINGS).due(
        ["measured-a", "new-1", "recent", "spent", "measured-b", "new-2"], counters, now)
    assert [(d.node_id, d.reason) for d in due] == [
        ("new-1", "new"), ("new-2", "new"), ("measured-b", "budget")]  # capped at 3
    wide = HonestySettings(**{**SETTINGS.model_dump(), "max_nodes_per_round": 10})
    due = VerificationScheduler(wide).due(list(counters), counters, now)
    assert [d.node_id for d in due] == ["measured-b", "measured-a"]  # longest unverified first
    # a round is never started beyond the budget: after it, the share is at most 10%
    for d in due:
        after = counters[d.node_id].verification + counters[d.node_id].round_cost
        assert after.requests <= 0.1 * rich.requests and after.tokens <= 0.1 * rich.tokens


def test_deciding_a_thousand_nodes_is_cheap() -> None:
    now = 1e6
    counters = {f"n{i:04d}": ledger(f"n{i:04d}", 1 + i % 7, now - 10 * i, Traffic(150, 60_000, 9000))
                for i in range(1000)}
    started = time.perf_counter()
    due = VerificationScheduler(HonestySettings(min_round_gap_s=0)).due(
        [*counters, "fresh"], counters, now)
    took = time.perf_counter() - started
    assert due[0].node_id == "fresh" and len(due) == 64
    assert took < 0.5, f"{took:.3f}s for 1,000 nodes"


def test_streaming_jobs_are_due_when_never_or_long_ago_audited() -> None:
    def job(job_id: str, at: float | None, enabled: bool = True) -> StreamingJob:
        return StreamingJob(job_id=job_id, node_id="n", url="http://127.0.0.1:9",  # type: ignore[arg-type]
                            node_key="ab" * 32, model="m", enabled=enabled, last_audited_at=at)

    jobs = [job("old", 100.0), job("fresh", 950.0), job("never", None), job("off", None, False)]
    assert [j.job_id for j in due_jobs(jobs, 1000.0, 600.0)] == ["never", "old"]
    assert due_jobs(jobs, 1000.0, 0.0) == []


@pytest.mark.parametrize(("states", "relays", "ok", "outcome", "words"), [
    (["unanswered", "answered"], 0, 0, Outcome.PASS, "answered"),
    (["answered", "unanswered"], 0, 0, Outcome.UNKNOWN, "last 1 round"),
    (["unanswered", "unanswered"], 40, 39, Outcome.FAIL, "evading"),
    (["unanswered", "unanswered"], 40, 10, Outcome.UNKNOWN, "down, not evading"),
    (["unanswered", "unanswered"], 3, 3, Outcome.UNKNOWN, "only 3 measuring requests"),
])
def test_unanswered_probes_are_evasion_only_while_measuring_is_answered(
        states: list[str], relays: int, ok: int, outcome: Outcome, words: str) -> None:
    judged = judge_evasion(SETTINGS, states, relays, ok)
    assert judged.outcome is outcome and words in judged.reason


def _prompt(node: str, i: int) -> Prompt:
    return Prompt(prompt_id=f"{node}|gsm8k|{i}|0|0", sample_key=f"{node}|gsm8k|{i}|0", node_id=node,
                  task="gsm8k", doc_id=i, request_index=0, n_requests=1, path="/v1/completions",
                  body={}, prompt_tokens=800, max_output_tokens=256, created_at=1.0)


def _relay(prompt: Prompt, code: ErrorCode, usage: int | None, started: float = 1.0) -> Relay:
    return Relay(prompt_id=prompt.prompt_id, sample_key=prompt.sample_key, node_id=prompt.node_id,
                 task=prompt.task, doc_id=prompt.doc_id, request_index=0, error_code=code,
                 response={"usage": {"completion_tokens": usage}} if usage is not None else None,
                 started_at=started, finished_at=started + 1)


def test_measuring_counts_follow_the_exact_scans_rule() -> None:
    prompts = {p.prompt_id: p for p in (_prompt("a", i) for i in range(3))}
    relays = [_relay(p, code, usage) for p, code, usage in zip(
        prompts.values(), [ErrorCode.OK, ErrorCode.OK, ErrorCode.NODE], [100, None, None],
        strict=True)]
    relays.append(_relay(_prompt("b", 0), ErrorCode.OK, 5))  # its prompt unknown: left out
    assert measuring_counts(relays, prompts) == {"a": {
        "requests": 3, "prompt_tokens": 2400, "completion_tokens": 100 + 256 + 256, "ok": 2}}


async def test_counters_add_up_per_node_over_the_window(mongo: MongoStores) -> None:
    now = time.time()
    prompts = {p.prompt_id: p for p in (_prompt("a", i) for i in range(4))}
    relays = [_relay(p, ErrorCode.OK, 10) for p in prompts.values()]
    await record_measuring(mongo, measuring_counts(relays[:3], prompts), now)
    await record_measuring(mongo, measuring_counts(relays[3:], prompts), now)
    round_verdicts = [Verdict("a", "identity", Outcome.PASS, "ok", {}, Traffic(0.5, 40, 8)),
                      Verdict("a", "synthetic", Outcome.PASS, "ok", {}, Traffic(0.5, 40, 8)),
                      Verdict("b", "identity", Outcome.UNKNOWN, "no reference")]
    await record_round_traffic(mongo, round_verdicts, now)
    await record_round_traffic(mongo, round_verdicts, now + 1)
    counters = await read_ledger(mongo, now - 3600)
    a, b = counters["a"], counters["b"]
    assert a.measuring == Traffic(4, 3200, 40) and a.measuring_ok == 4
    assert a.verification == Traffic(2, 160, 32) and a.rounds == 2
    assert a.round_cost == Traffic(1, 80, 16) and a.last_round_at == pytest.approx(now + 1)
    assert a.request_share == pytest.approx(0.5)
    assert b.rounds == 2 and b.verification == Traffic() and b.measuring == Traffic()
    assert await read_ledger(mongo, now + 3 * 86400) == {}  # older days are out of the window


async def test_an_evader_is_flagged_after_its_rounds_in_a_row(mongo: MongoStores) -> None:
    now = time.time()
    relays = [_relay(_prompt("ev", i), ErrorCode.OK, 10, started=now + i) for i in range(8)]
    await mongo.relays.record_relays(relays)

    def round_of(seed: int, state: str) -> list[Verdict]:
        return [Verdict("ev", "identity", Outcome.UNKNOWN, "unknown: node did not answer",
                        {"model": "m", "seed": seed, PROBES_KEY: state})]

    judged = []
    for seed, state, ts in ((1, "answered", now - 20), (2, "unanswered", now - 10),
                            (3, "unanswered", now + 30)):
        verdicts = round_of(seed, state)
        await mongo.verdicts.record([v.to_record(f"m:{seed}", ts) for v in verdicts])
        judged += await judge_round_evasion(SETTINGS, mongo, verdicts, ts)
    assert [(r.outcome, r.verdict_id) for r in judged] == [
        (Outcome.PASS, "evasion|ev|m:1"), (Outcome.UNKNOWN, "evasion|ev|m:2"),
        (Outcome.FAIL, "evasion|ev|m:3")]
    assert judged[-1].evidence["measuring_relays"] == 8 and "8 of 8" in judged[-1].reason
    # chat-only nodes and nodes without a reference were not probed: nothing to judge
    unprobed = [Verdict("c", "identity", Outcome.UNKNOWN, "chat", {PROBES_KEY: "unsupported"})]
    assert await judge_round_evasion(SETTINGS, mongo, unprobed, now) == []
