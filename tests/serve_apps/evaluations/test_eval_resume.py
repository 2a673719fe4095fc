"""A run survives the death of the Serve replica executing it, and resumes where it was.

The replica is killed mid-run (``ray.kill``: no shutdown hook runs, as in a crash). Serve
starts a new replica; once the dead owner's lease runs out it claims the run and goes on:
docs already scored are not measured again, and no request whose relay was recorded is
sent again, so the node sees at most the docs that were in flight twice. The results equal
an uninterrupted run's.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import ray
from eval_app import EvalApp, done_docs, wait_for

from cluster.testing.testnode import TestNode

pytestmark = pytest.mark.slow

LIMIT = 40
REQUESTS_PER_DOC = 4  # openbookqa: one loglikelihood request per choice


def _replicas(app_name: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve"
            and a["name"].startswith(f"SERVE_REPLICA::{app_name}#")]


def test_a_killed_replicas_run_resumes_without_repeating_recorded_requests(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path
) -> None:
    slow, fast = eval_nodes["slow"], eval_nodes["fast"]
    body = {"model": "smollm2", "tokenizer": str(smollm2_dir), "tasks": ["openbookqa"],
            "limit": LIMIT}
    concurrency = eval_app.settings.evaluations.per_run_concurrency
    [replica] = _replicas(eval_app.name)
    with eval_app.client("alice") as api:
        before = slow.stats.requests
        run_id = api.post("/v1/evaluations", json={**body, "endpoint": slow.base_url}).json()["id"]
        wait_for(api, run_id, {"running"}, until=lambda s: done_docs(s) >= 12)

        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        sent_before_kill = slow.stats.requests - before

        done = wait_for(api, run_id, {"complete"}, timeout_s=300)
        assert done["attempts"] == 2
        assert _replicas(eval_app.name) != [replica]  # Serve replaced the replica
        sent = slow.stats.requests - before
        n_prompts = LIMIT * REQUESTS_PER_DOC
        # A restart from scratch would send everything sent before the kill again; a
        # resume re-sends only the docs that were in flight (their relays not yet recorded).
        assert sent < n_prompts + sent_before_kill
        assert sent <= n_prompts + concurrency * REQUESTS_PER_DOC
        logs = api.get(f"/v1/evaluations/{run_id}/logs", params={"follow": "false"}).text
        assert re.search(r"openbookqa: resuming, (\d+)/40 docs already scored", logs)
        resumed = api.get(f"/v1/evaluations/{run_id}/results").json()

        # the same evaluation, never interrupted, on an identical node
        clean_id = api.post("/v1/evaluations", json={**body, "endpoint": fast.base_url}
                            ).json()["id"]
        wait_for(api, clean_id, {"complete"})
        clean = api.get(f"/v1/evaluations/{clean_id}/results").json()
    assert resumed["results"] == clean["results"]
    assert resumed["n-samples"] == clean["n-samples"] == {
        "openbookqa": {"original": 500, "effective": LIMIT}}
    print(f"resumed {time.monotonic() - killed_at:.1f}s after the kill")
