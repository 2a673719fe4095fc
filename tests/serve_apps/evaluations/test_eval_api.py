"""The evaluations API over real HTTP: bad requests, tenants, cancel, logs, listing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from eval_app import TENANTS, EvalApp, done_docs, wait_for

from cluster.testing.testnode import TestNode
from serve_apps.evaluations.client import parse_sse


def _body(node: TestNode, tokenizer: Path, **extra: Any) -> dict[str, Any]:
    return {"endpoint": node.base_url, "model": "smollm2", "tokenizer": str(tokenizer),
            "tasks": ["openbookqa"], "limit": 2} | extra


@pytest.mark.parametrize(("headers", "why"), [
    ({}, "no token"),
    ({"Authorization": "Bearer not-a-tenant-token-at-all"}, "unknown token"),
    ({"Authorization": f"Basic {TENANTS['alice']}"}, "wrong scheme"),
])
def test_requests_without_a_tenant_token_get_401(
    eval_app: EvalApp, headers: dict[str, str], why: str
) -> None:
    with httpx.Client(base_url=eval_app.url, headers=headers, timeout=30) as anon:
        for method, path in [("GET", "/v1/evaluations"), ("POST", "/v1/evaluations"),
                             ("GET", "/v1/evaluations/abc"), ("DELETE", "/v1/evaluations/abc"),
                             ("GET", "/v1/evaluations/abc/results")]:
            resp = anon.request(method, path, json={} if method == "POST" else None)
            assert resp.status_code == 401, (why, method, path, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
            assert resp.json()["error"]["code"] == "unauthorized"


BAD_BODIES = [
    ({"tasks": []}, 422, "body.tasks"),
    ({"tasks": ["openbookqa", "openbookqa"]}, 422, "body.tasks"),
    ({"tasks": ["no_such_task"]}, 400, "tasks"),
    ({"api": "chat-completions"}, 400, "api"),  # openbookqa needs loglikelihoods
    ({"api": "embeddings"}, 422, "body.api"),
    ({"limit": 0}, 422, "body.limit"),
    ({"limit": "5"}, 422, "body.limit"),
    ({"limit": 10**7}, 422, "body.limit"),
    ({"num_fewshot": -1}, 422, "body.num_fewshot"),
    ({"endpoint": "not a url"}, 422, "body.endpoint"),
    ({"endpoint": "http://127.0.0.1:9/?x=1"}, 422, "body.endpoint"),
    ({"endpoint": "ftp://127.0.0.1/"}, 422, "body.endpoint"),
    ({"endpoint": "https://" + ".".join(["a" * 63] * 32)}, 422, "body.endpoint"),  # schemathesis
    ({"model": ""}, 422, "body.model"),
    ({"model": "bad\nname"}, 422, "body.model"),
    ({"gen_kwargs": {"a.b": 1}}, 422, "body.gen_kwargs"),
    ({"gen_kwargs": {"temperature": {"nested": 1}}}, 422, "body.gen_kwargs"),
    ({"gen_kwargs": {"max_gen_toks": 2**70}}, 422, "body.gen_kwargs"),
    ({"unknown_field": 1}, 422, "body.unknown_field"),
]


@pytest.mark.parametrize(("change", "status", "param"), BAD_BODIES)
def test_bad_bodies_get_a_clear_4xx_naming_the_field(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path,
    change: dict[str, Any], status: int, param: str,
) -> None:
    with eval_app.client("alice") as api:
        resp = api.post("/v1/evaluations", json=_body(eval_nodes["fast"], smollm2_dir, **change))
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"].startswith(param), error
    assert error["message"]


def test_malformed_requests_get_422(eval_app: EvalApp) -> None:
    with eval_app.client("alice") as api:
        resp = api.post("/v1/evaluations", content=b"{not json",
                        headers={"Content-Type": "application/json"})
        assert resp.status_code == 422
        assert "not valid JSON" in resp.json()["error"]["message"]
        assert api.get("/v1/evaluations", params={"limit": 0}).status_code == 422
        assert api.get("/v1/evaluations", params={"state": "bogus"}).status_code == 422
        assert api.get("/v1/evaluations/bad%20id").status_code == 422
        resp = api.get("/v1/evaluations/0123456789abcdef")
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"


def test_a_tenant_sees_only_its_own_runs(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path
) -> None:
    with eval_app.client("alice") as alice, eval_app.client("bob") as bob:
        resp = alice.post("/v1/evaluations", json=_body(eval_nodes["fast"], smollm2_dir, limit=1))
        assert resp.status_code == 202, resp.text
        run_id = resp.json()["id"]
        assert resp.json()["state"] == "new"
        for path in (f"/v1/evaluations/{run_id}", f"/v1/evaluations/{run_id}/results",
                     f"/v1/evaluations/{run_id}/logs"):
            resp = bob.get(path, params={"follow": "false"})
            assert resp.status_code == 404, path
            assert resp.json()["error"]["message"] == f"no evaluation {run_id!r}"
        assert bob.delete(f"/v1/evaluations/{run_id}").status_code == 404
        assert run_id not in {r["id"] for r in bob.get("/v1/evaluations").json()["data"]}

        wait_for(alice, run_id, {"complete"})
        assert alice.get(f"/v1/evaluations/{run_id}/results").status_code == 200
        assert bob.get(f"/v1/evaluations/{run_id}/results").status_code == 404
        newest = alice.get("/v1/evaluations", params={"limit": 1}).json()
        assert newest["data"][0]["id"] == run_id
        assert newest["limit"] == 1 and newest["offset"] == 0
        assert newest["next_offset"] == (1 if newest["total"] > 1 else None)
        complete = alice.get("/v1/evaluations", params={"state": "complete"}).json()
        assert run_id in {r["id"] for r in complete["data"]}
        # the state's name before LMEvalJob's names still filters
        legacy = alice.get("/v1/evaluations", params={"state": "succeeded"}).json()
        assert run_id in {r["id"] for r in legacy["data"]}
        # a finished run cannot be cancelled
        resp = alice.delete(f"/v1/evaluations/{run_id}")
        assert resp.status_code == 409
        assert resp.json()["error"]["code"] == "already_finished"


def _sse_events(client: httpx.Client, run_id: str, **params: str) -> list[tuple[str, Any, str]]:
    with client.stream("GET", f"/v1/evaluations/{run_id}/logs", params=params,
                       timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        return parse_sse(resp.read().decode())


def test_cancel_stops_a_running_evaluation_and_its_requests(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path
) -> None:
    slow = eval_nodes["slow"]
    with eval_app.client("alice") as api:
        resp = api.post("/v1/evaluations", json=_body(slow, smollm2_dir, tasks=["gsm8k"],
                                                      limit=200))
        assert resp.status_code == 202, resp.text
        run_id = resp.json()["id"]
        running = wait_for(api, run_id, {"running"}, until=lambda s: done_docs(s) >= 8)
        assert running["progress"][0]["total"] == 200

        resp = api.delete(f"/v1/evaluations/{run_id}")
        assert resp.status_code == 200
        assert resp.json()["cancel_requested"] is True
        asked = time.monotonic()
        # following the log ends by itself once the run is cancelled
        events = _sse_events(api, run_id)
        assert events[-1][0] == "end" and json.loads(events[-1][2])["state"] == "cancelled"
        cancelled = wait_for(api, run_id, {"cancelled"}, timeout_s=15)
        assert time.monotonic() - asked < 15
        assert done_docs(cancelled) < 200
        assert cancelled["finished_at"] is not None

        sent = slow.stats.requests
        time.sleep(1.5)
        assert slow.stats.requests - sent <= 4  # at most the requests that were in flight
        messages = [json.loads(data)["message"] for kind, _, data in events if kind == "log"]
        assert "cancel requested by tenant alice" in messages
        assert messages[-1] == "cancelled"

        resp = api.get(f"/v1/evaluations/{run_id}/results")
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "no_results"
        again = api.delete(f"/v1/evaluations/{run_id}")
        assert again.status_code == 200 and again.json()["state"] == "cancelled"


def test_logs_resume_after_the_last_event_id(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path
) -> None:
    with eval_app.client("alice") as api:
        run_id = api.post("/v1/evaluations", json=_body(eval_nodes["fast"], smollm2_dir)
                          ).json()["id"]
        wait_for(api, run_id, {"complete"})
        events = _sse_events(api, run_id, follow="false")
        logs = [e for e in events if e[0] == "log"]
        assert json.loads(logs[0][2])["message"] == "queued by tenant alice"
        assert json.loads(logs[-1][2])["message"] == "succeeded"
        assert events[-1][0] == "end"
        after = api.get(f"/v1/evaluations/{run_id}/logs", params={"follow": "false"},
                        headers={"Last-Event-ID": logs[1][1]})
        assert [e[1] for e in parse_sse(after.text) if e[0] == "log"] == [
            e[1] for e in logs[2:]]


def test_runs_that_cannot_measure_fail_with_the_reason(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path
) -> None:
    with eval_app.client("alice") as api:
        no_tokenizer = api.post("/v1/evaluations", json=_body(
            eval_nodes["fast"], smollm2_dir) | {"tokenizer": "/nonexistent/tokenizer"}
        ).json()["id"]
        nobody_home = api.post("/v1/evaluations", json=_body(
            eval_nodes["fast"], smollm2_dir, endpoint="http://127.0.0.1:9", tasks=["gsm8k"],
            limit=1)).json()["id"]
        for run_id, reason in [(no_tokenizer, "/nonexistent/tokenizer"),
                               (nobody_home, "every one of 1 docs failed")]:
            failed = wait_for(api, run_id, {"failed"}, timeout_s=120)
            assert reason in failed["error"]
            resp = api.get(f"/v1/evaluations/{run_id}/results")
            assert resp.status_code == 409 and reason in resp.json()["error"]["message"]


def test_suspend_and_resume_over_http(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path
) -> None:
    with eval_app.client("alice") as api:
        run_id = api.post("/v1/evaluations", json=_body(
            eval_nodes["slow"], smollm2_dir, tasks=["gsm8k"], limit=24)).json()["id"]
        wait_for(api, run_id, {"running"}, until=lambda s: done_docs(s) >= 2)
        resp = api.post(f"/v1/evaluations/{run_id}/suspend")
        assert resp.status_code == 200, resp.text
        suspended = wait_for(api, run_id, {"suspended"}, timeout_s=30)
        assert suspended["overall"]["done"] < 24 and suspended["overall"]["eta_s"] is None
        assert api.get("/v1/evaluations", params={"state": "suspended"}).json()["total"] >= 1
        resp = api.post(f"/v1/evaluations/{run_id}/resume")
        assert resp.status_code == 200 and resp.json()["state"] == "new"
        done = wait_for(api, run_id, {"complete"})
        assert done["overall"] | {"elapsed_s": None, "updated_at": None} == {
            "percent": 100.0, "count": "24/24", "done": 24, "total": 24, "elapsed_s": None,
            "eta_s": None, "updated_at": None}
        assert done["attempts"] == 2
        resp = api.post(f"/v1/evaluations/{run_id}/suspend")
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "already_finished"


def test_a_tenant_without_an_allowlist_cannot_evaluate_loopback(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path
) -> None:
    with eval_app.client("carol") as carol:
        for endpoint in (eval_nodes["fast"].base_url, "http://localhost:8000",
                         "http://[::ffff:127.0.0.1]:8000", "http://169.254.169.254/"):
            resp = carol.post("/v1/evaluations", json=_body(eval_nodes["fast"], smollm2_dir,
                                                            endpoint=endpoint))
            assert resp.status_code == 400, (endpoint, resp.text)
            error = resp.json()["error"]
            assert (error["code"], error["param"]) == ("endpoint_refused", "endpoint")
        assert carol.get("/v1/evaluations").json()["total"] == 0
