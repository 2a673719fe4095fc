"""The evaluation core without Ray: specs, prompts, leases, the leaderboard's numbers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cluster.core.buffers import UnmeasurablePair
from cluster.core.errors import ErrorCode
from cluster.core.evaluations import EvaluationRun, EvaluationSpec, RunState
from cluster.core.settings import PROJECT_ROOT, Settings
from cluster.core.verdicts import Check, Outcome, VerdictRecord
from cluster.evaluations.runs import new_run, request_cancel
from cluster.evaluations.scoring import build_doc_prompts
from cluster.evaluations.worker import claim_run, finish_run
from cluster.storage.connections import StoreConnections
from cluster.storage.mongo import EvaluationStore
from cluster.tasks.lmeval import load_task_adapter
from serve_apps.evaluations.client import parse_sse
from serve_apps.evaluations.leaderboard import (
    build_leaderboard,
    cells_from_summaries,
    headline_metric,
    latest_verdicts,
    score_series,
    verdict_of,
)

SPEC = EvaluationSpec(endpoint="http://127.0.0.1:9/v1/completions", model="m",
                      tasks=["gsm8k"], limit=2)


def test_an_lm_eval_style_endpoint_is_the_servers_base_url() -> None:
    assert SPEC.endpoint == "http://127.0.0.1:9"
    assert SPEC.node("abc").node_id == "eval-abc"
    assert SPEC.lmeval_model_args() == "base_url=http://127.0.0.1:9/v1/completions,model=m"
    with pytest.raises(ValueError):
        EvaluationSpec(endpoint="http://h/?q=1", model="m", tasks=["gsm8k"])


def test_gen_kwargs_reach_the_request_bodies_as_lm_eval_sends_them(smollm2_dir: Path) -> None:
    adapter = load_task_adapter("gsm8k", PROJECT_ROOT / "datasets", str(smollm2_dir),
                                "completions", "smollm2")
    doc = {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}
    node = SPEC.node("r1")
    plain = build_doc_prompts(adapter, node, 0, doc, 1.0)
    tuned = build_doc_prompts(adapter, node, 0, doc, 1.0, {"max_gen_toks": 7, "until": ["Q:"]})
    assert [p.prompt_id for p in tuned] == ["eval-r1|gsm8k|0|0|0"]  # run, task, doc, index
    assert plain[0].body["max_tokens"] == 256 and tuned[0].body["max_tokens"] == 7
    assert "Q:" in tuned[0].body["stop"] and "Question:" not in tuned[0].body["stop"]
    assert {k: v for k, v in plain[0].body.items() if k not in ("max_tokens", "stop")} == {
        k: v for k, v in tuned[0].body.items() if k not in ("max_tokens", "stop")}


def test_headline_metric_prefers_lm_evals_plain_or_strict_filter() -> None:
    assert headline_metric(["acc_norm,none", "acc,none"]) == "acc,none"
    assert headline_metric(["exact_match,flexible-extract", "exact_match,strict-match"]
                           ) == "exact_match,strict-match"
    assert headline_metric(["psnr,x"]) == "psnr,x" and headline_metric([]) is None


def test_score_series_is_the_rolling_buffer_mean_with_failures_as_zero() -> None:
    docs = [
        {"node_id": "n", "task": "t", "created_at": float(i), "error_code": code,
         "metrics": {"acc,none": value}}
        for i, (code, value) in enumerate([(0, 1.0), (0, 0.0), (2, 1.0), (0, 1.0), (1, 1.0)])
    ]
    [series] = score_series(reversed(docs), {"t": "acc,none"}, window=2)
    # the RELAY failure (code 1) is the bench's fault: left out; the NODE failure counts 0
    assert series.points == [(0.0, 1.0), (1.0, 0.5), (2.0, 0.0), (3.0, 0.5)]


def test_cells_and_verdicts_read_what_the_loop_writes() -> None:
    [cell] = cells_from_summaries([{
        "node_id": "n", "task": "gsm8k", "n": 4, "n_ok": 3, "error_rate": 0.25,
        "errors_by_code": {"node": 1}, "latency_p50_s": 0.1, "latency_p95_s": None,
        "updated_at": 5.0, "metrics": {"exact_match,strict-match": {"mean": 0.5, "stderr": 0.2},
                                       "exact_match,flexible-extract": {"mean": 0.75,
                                                                        "stderr": None}},
    }])
    assert (cell.metric, cell.mean, cell.stderr) == ("exact_match,strict-match", 0.5, 0.2)
    def record(check: Check, outcome: Outcome, ts: float = 3.0) -> VerdictRecord:
        return VerdictRecord(verdict_id=f"{check}|n|{ts}", node_id="n", check=check,
                             outcome=outcome, reason="why", ts=ts)

    assert verdict_of(record(Check.POC, Outcome.FAIL)).label == "fail"
    out = verdict_of(record(Check.IDENTITY, Outcome.PASS))
    assert (out.kind, out.passed, out.at) == ("identity", True, 3.0)
    unknown = verdict_of(record(Check.SUBSTITUTION, Outcome.UNKNOWN))
    assert (unknown.label, unknown.passed) == ("unknown", None)  # never shown as a pass
    latest = latest_verdicts([record(Check.IDENTITY, Outcome.FAIL, 1.0),
                              record(Check.IDENTITY, Outcome.PASS, 2.0),
                              record(Check.RERUN, Outcome.FAIL, 2.0)])
    assert [(v.kind, v.label) for v in latest["n"]] == [("identity", "pass")]


def test_the_leaderboard_shows_pairs_that_cannot_be_measured_with_their_reason() -> None:
    summary = {"node_id": "n", "task": "gsm8k", "n": 2, "error_rate": 0.0, "updated_at": 1.0,
               "metrics": {"exact_match,strict-match": {"mean": 1.0, "stderr": 0.0}}}
    stuck = UnmeasurablePair(node_id="gone", task="openbookqa", reason="no tokenizer",
                             since=2.0, last_attempt_at=9.0, attempts=3)
    board = build_leaderboard([summary], {"n": "smollm2", "gone": "smollm2"}, [], [],
                              window=4, now=10.0, unmeasurable=[stuck])
    assert board.tasks == ["gsm8k", "openbookqa"]
    assert [n.node_id for n in board.nodes] == ["gone", "n"]
    assert [(c.node_id, c.task) for c in board.cells] == [("n", "gsm8k")]
    [cell] = board.model_dump(mode="json")["unmeasurable"]
    assert cell == {"node_id": "gone", "task": "openbookqa", "reason": "no tokenizer",
                    "since": 2.0, "attempts": 3}


def test_sse_parsing_keeps_ids_and_drops_keepalives() -> None:
    text = "id: 1-a\nevent: log\ndata: {}\n\n: keep-alive\n\nevent: end\ndata: x\ndata: y\n\n"
    assert parse_sse(text) == [("log", "1-a", "{}"), ("end", None, "x\ny")]


async def _lease_story(settings: Settings) -> None:
    conns = StoreConnections(settings)
    try:
        store = EvaluationStore(await conns.mongo())
        await store.create(new_run(SPEC, "t", "r1", now=100.0))
        first = await claim_run(store, "r1", "a", now=101.0, lease_s=10.0)
        assert first is not None and first.owner == "a" and first.attempts == 1
        assert await claim_run(store, "r1", "b", now=105.0, lease_s=10.0) is None  # leased
        second = await claim_run(store, "r1", "b", now=112.0, lease_s=10.0)  # lease ran out
        assert second is not None and second.owner == "b" and second.attempts == 2
        assert second.started_at == 101.0
        # the old owner can no longer finish it
        assert await finish_run(store, "r1", "a", RunState.COMPLETE, now=113.0) is None

        def bump(run: EvaluationRun) -> bool:
            run.progress_of("gsm8k").done += 1
            return True

        rev = second.rev
        await asyncio.gather(*(store.mutate("r1", bump) for _ in range(5)))
        after = await store.get("r1")
        assert after is not None and after.progress[0].done == 5 and after.rev == rev + 5

        flagged = await request_cancel(store, "r1", now=114.0)
        assert flagged is not None and flagged.cancel_requested
        assert flagged.state == RunState.SCHEDULED  # its owner stops it
        # ... unless the owner is gone: whoever claims it next cancels it instead
        assert await claim_run(store, "r1", "c", now=200.0, lease_s=10.0) is None
        gone = await store.get("r1")
        assert gone is not None and gone.state == RunState.CANCELLED

        await store.create(new_run(SPEC, "t", "r2", now=300.0))
        queued = await request_cancel(store, "r2", now=301.0)
        assert queued is not None and queued.state == RunState.CANCELLED
        assert [r.run_id for r in await store.claimable(now=400.0, limit=10)] == []
        _, total = await store.list("t", state=RunState.CANCELLED, offset=0, limit=1)
        assert total == 2
        assert ErrorCode.OK.counts_against_node
    finally:
        await conns.close()


def test_leases_cas_and_cancel_decide_who_runs_what(fresh_settings: Settings) -> None:
    asyncio.run(_lease_story(fresh_settings))


def test_tenants_come_from_settings_with_long_distinct_tokens(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from cluster.core.settings import EvaluationSettings, load_settings
    from serve_apps.evaluations.config import EvaluationsAppConfig

    with pytest.raises(ValidationError, match="shorter than 16"):
        EvaluationSettings(tenants={"a": "short"})
    with pytest.raises(ValidationError, match="share a token"):
        EvaluationSettings(tenants={"a": "x" * 16, "b": "x" * 16})
    env = {"TESTBENCH_EVALUATIONS__TENANTS": "{alice: abcdefghijklmnop}"}
    assert load_settings(None, environ=env).evaluations.tenants == {"alice": "abcdefghijklmnop"}
    # the Serve app: a settings file, its args merged over it, the environment on top
    path = tmp_path / "settings.yaml"
    path.write_text("evaluations:\n  lease_s: 9\n  poll_s: 2\n")
    app = EvaluationsAppConfig(settings_path=path, settings={"evaluations": {"poll_s": 3}})
    settings = app.load_settings(environ={"TESTBENCH_EVALUATIONS__LEASE_S": "7"})
    assert (settings.evaluations.lease_s, settings.evaluations.poll_s) == (7.0, 3.0)
