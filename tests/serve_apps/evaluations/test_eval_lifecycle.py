"""LMEvalJob's lifecycle in the evaluation service, in process (the service class, its
worker and runner on the session's stores, real test nodes; no Serve): states, suspend and
resume without repeating answered requests, progress every few seconds on a slow node, and
the endpoint policy per tenant."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.core.evaluations import EvaluationRun, RunState
from cluster.core.settings import (
    EndpointAllowlist,
    EvaluationSettings,
    RequesterSettings,
    Settings,
    StoreSettings,
)
from cluster.evaluations.progress import ProgressMeter
from cluster.evaluations.runs import new_run, request_resume, request_suspend
from cluster.evaluations.worker import claim_run
from cluster.storage.connections import StoreConnections
from cluster.storage.mongo import EvaluationStore
from cluster.storage.mongo.base import EVALUATION_RELAYS, EVALUATIONS
from cluster.testing.testnode import NodeBehaviour, TestNode
from serve_apps.evaluations import protocol as wire
from serve_apps.evaluations.serving import ApiError, EvaluationService, overall_progress

TOKEN = "tenant-token-0123456789abcdef"


def service_settings(stores: StoreSettings, **evaluations: Any) -> Settings:
    stores = stores.model_copy(update={"mongo_database": f"lc_{uuid.uuid4().hex[:10]}"})
    cfg: dict[str, Any] = {
        "tenants": {"t": TOKEN, "closed": "closed-token-0123456789abc"},
        # loopback (the test nodes) allowlisted explicitly for tenant t only
        "endpoint_allowlists": {"t": EndpointAllowlist.loopback()},
        "max_concurrent_runs": 1, "per_run_concurrency": 2, "chunk_docs": 8,
        "lease_s": 3.0, "poll_s": 0.2,
    }
    return Settings(stores=stores, evaluations=EvaluationSettings(**(cfg | evaluations)),
                    requester=RequesterSettings(endpoint_allowlist=EndpointAllowlist.loopback()))


@pytest.fixture
async def slow_node(smollm2_dir: Path) -> AsyncIterator[TestNode]:
    node = TestNode(NodeBehaviour(mode="correct", latency_s=0.3), tokenizer_path=smollm2_dir)
    await node.start()
    yield node
    await node.stop()


async def _started(settings: Settings) -> EvaluationService:
    service = EvaluationService(settings)
    await service.start()
    return service


def _request(node: TestNode, tokenizer: Path, **extra: Any) -> wire.EvaluationRequest:
    return wire.EvaluationRequest.model_validate({
        "endpoint": node.base_url, "model": "smollm2", "tokenizer": str(tokenizer),
        "tasks": ["openbookqa"], "limit": 16} | extra)


async def _wait(service: EvaluationService, run_id: str,
                until: Callable[[wire.EvaluationStatus], bool], timeout_s: float = 60.0,
                every_s: float = 0.1) -> wire.EvaluationStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await service.status("t", run_id)
        if until(status):
            return status
        assert status.state not in ("failed", "cancelled"), status.error
        assert time.monotonic() < deadline, status
        await asyncio.sleep(every_s)


async def _count(settings: Settings, collection: str) -> int:
    stores = StoreConnections(settings)
    try:
        return int(await (await stores.mongo()).database[collection].count_documents({}))
    finally:
        await stores.close()


async def test_suspend_and_resume_never_repeat_an_answered_request(
    loaded_stores: StoreSettings, slow_node: TestNode, smollm2_dir: Path
) -> None:
    settings = service_settings(loaded_stores)
    service = await _started(settings)
    n_prompts = 16 * 4  # openbookqa: one request per choice
    try:
        status = await service.submit("t", _request(slow_node, smollm2_dir))
        run_id = status.id
        assert status.state == "new"
        await _wait(service, run_id, lambda s: s.state == "running" and s.overall.done >= 3)
        await service.suspend("t", run_id)
        suspended = await _wait(service, run_id, lambda s: s.state == "suspended")
        assert not suspended.suspend_requested and suspended.overall.eta_s is None
        await asyncio.sleep(0.8)  # requests cut off in flight reach the node meanwhile
        sent_before = slow_node.stats.requests
        answered_before = await _count(settings, EVALUATION_RELAYS)
        assert 0 < answered_before < n_prompts
        # a suspended run sends nothing and stays suspended
        await asyncio.sleep(1.0)
        assert slow_node.stats.requests == sent_before
        assert (await service.status("t", run_id)).state == "suspended"

        resumed = await service.resume("t", run_id)
        assert resumed.state == "new"
        done = await _wait(service, run_id, lambda s: s.state == "complete")
        # exactly the requests without an answer went out again: none answered twice
        assert slow_node.stats.requests - sent_before == n_prompts - answered_before
        assert await _count(settings, EVALUATION_RELAYS) == n_prompts
        assert done.attempts == 2 and done.overall.percent == 100.0
        assert done.overall.count == "16/16" and done.progress[0].failed == 0
        results = await service.results("t", run_id, samples=False)
        assert results["n-samples"]["openbookqa"]["effective"] == 16
        # ended runs can be neither suspended nor resumed
        for action in (service.suspend, service.resume):
            with pytest.raises(ApiError) as refused:
                await action("t", run_id)
            assert refused.value.status_code == 409
        lines = [line.message async for line in _logs(service, run_id)]
        assert "suspend requested by tenant t" in lines and "suspended" in lines
        assert "resumed by tenant t" in lines
        assert any(m.startswith("openbookqa: resuming, ") for m in lines)
    finally:
        await service.stop()


async def _logs(service: EvaluationService, run_id: str) -> AsyncIterator[Any]:
    for line in await service.store.logs_after(run_id):
        yield line


async def test_progress_moves_at_most_a_few_seconds_apart_on_a_slow_node(
    loaded_stores: StoreSettings, smollm2_dir: Path
) -> None:
    """A node taking 1.5 s per request, two at a time, all 8 docs in one chunk: progress
    used to move once per chunk (6 s here, 100-130 s on a real Serve node); now with each
    answered request, written every ``progress_every_s`` (2 s by default)."""
    node = TestNode(NodeBehaviour(mode="correct", latency_s=1.5), tokenizer_path=smollm2_dir)
    await node.start()
    settings = service_settings(loaded_stores)
    assert settings.evaluations.progress_every_s == 2.0
    service = await _started(settings)
    seen: list[tuple[float, wire.RunProgressOut]] = []
    try:
        run_id = (await service.submit("t", _request(node, smollm2_dir, tasks=["gsm8k"],
                                                     limit=8))).id

        def record(status: wire.EvaluationStatus) -> bool:
            if status.state == "running" and (
                    not seen or seen[-1][1].updated_at != status.overall.updated_at):
                seen.append((time.monotonic(), status.overall))
            return status.state == "complete"

        await _wait(service, run_id, record, every_s=0.1)
    finally:
        await service.stop()
        await node.stop()
    times = [t for t, _ in seen]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    percents = [p.percent for _, p in seen]
    print(f"progress writes while running: {len(seen)}, largest gap {max(gaps):.2f} s")
    assert len(seen) >= 3, seen
    assert max(gaps) <= 5.0, gaps
    assert percents == sorted(percents) and len(set(percents)) >= 3, percents
    assert all(p.total == 8 and p.count == f"{p.done}/8" for _, p in seen)
    assert any(p.eta_s is not None and p.eta_s > 0 for _, p in seen[1:-1]), seen
    assert all(p.elapsed_s is not None for _, p in seen)


async def test_a_tenants_endpoint_must_pass_its_policy(
    loaded_stores: StoreSettings, slow_node: TestNode, smollm2_dir: Path
) -> None:
    service = await _started(service_settings(loaded_stores, max_concurrent_runs=0))
    try:
        for endpoint, why in ((slow_node.base_url, "a loopback address"),
                              ("http://localhost:9", "localhost resolves to"),
                              ("http://[::1]:9", "::1, a loopback address"),
                              ("http://169.254.169.254", "a cloud metadata address"),
                              ("http://10.0.0.1:8000", "a private address")):
            with pytest.raises(ApiError) as refused:
                await service.submit("closed", _request(slow_node, smollm2_dir,
                                                        endpoint=endpoint))
            assert refused.value.status_code == 400, endpoint
            assert refused.value.error_code == "endpoint_refused"
            assert refused.value.param == "endpoint"
            assert why in refused.value.message and "tenant closed" in refused.value.message
        # tenant t allowlists loopback, not the metadata service or private networks
        assert (await service.submit("t", _request(slow_node, smollm2_dir))).state == "new"
        with pytest.raises(ApiError, match="cloud metadata"):
            await service.submit("t", _request(slow_node, smollm2_dir,
                                               endpoint="http://169.254.169.254"))
        with pytest.raises(ApiError, match="private address"):
            await service.submit("t", _request(slow_node, smollm2_dir,
                                               endpoint="http://10.0.0.1:8000"))
    finally:
        await service.stop()


# -- the state machine and the meter, without any node ------------------------------------


async def test_states_before_lmevaljobs_names_are_read_and_claimed(
    fresh_settings: Settings,
) -> None:
    conns = StoreConnections(fresh_settings)
    try:
        store = EvaluationStore(await conns.mongo())
        run = new_run(_request_spec(), "t", "old", now=1.0)
        # a run stored as it was before: state "queued" in both the record and the index
        doc = {"_id": "old", "tenant": "t", "state": "queued", "created_at": 1.0,
               "lease_until": 0.0, "rev": 0,
               "record": run.model_dump_json().replace('"state":"new"', '"state":"queued"')}
        await (await conns.mongo()).database[EVALUATIONS].insert_one(doc)
        stored = await store.get("old")
        assert stored is not None and stored.state is RunState.NEW
        assert RunState("succeeded") is RunState.COMPLETE
        assert [r.run_id for r in await store.claimable(now=5.0, limit=5)] == ["old"]
        _, total = await store.list("t", state=RunState.NEW, offset=0, limit=5)
        assert total == 1
        # suspended while new: nobody claims it until it is resumed
        assert (await request_suspend(store, "old")).state is RunState.SUSPENDED  # type: ignore[union-attr]
        assert await store.claimable(now=6.0, limit=5) == []
        assert await claim_run(store, "old", "a", now=6.0, lease_s=5.0) is None
        assert (await request_resume(store, "old")).state is RunState.NEW  # type: ignore[union-attr]
        claimed = await claim_run(store, "old", "a", now=7.0, lease_s=5.0)
        assert claimed is not None and claimed.state is RunState.SCHEDULED
        # suspending a held run asks its owner; resuming before it acts withdraws that
        asked = await request_suspend(store, "old")
        assert asked is not None and asked.suspend_requested and asked.state.active
        withdrawn = await request_resume(store, "old")
        assert withdrawn is not None and not withdrawn.suspend_requested
    finally:
        await conns.close()


def _request_spec() -> Any:
    from cluster.core.evaluations import EvaluationSpec

    return EvaluationSpec(endpoint="http://127.0.0.1:9", model="m", tasks=["gsm8k"])


def test_the_meter_counts_answered_requests_of_docs_in_flight() -> None:
    now = [100.0]
    meter = ProgressMeter(["a", "b"], clock=lambda: now[0])
    meter.counted("a", total=4, done=1, failed=0)  # one doc scored by an earlier attempt
    meter.counted("b", total=4, done=0, failed=0)
    meter.start()
    assert meter.percent() == pytest.approx(12.5) and meter.eta_s() is None
    meter.doc_started("a", 5, requests=4, answered=0)
    now[0] += 10.0
    meter.request_answered("a", 5)
    meter.request_answered("a", 5)
    assert meter.percent() == pytest.approx(100 * 1.5 / 8)
    # half a doc in 10 s, 6.5 docs left: 130 s
    assert meter.eta_s() == pytest.approx(130.0)
    meter.doc_scored("a", 5, failed=True)
    [a, _] = meter.progress()
    assert (a.done, a.failed, a.total) == (2, 1, 4)
    assert meter.percent() == pytest.approx(25.0)


def test_overall_progress_reports_percent_count_elapsed_and_eta() -> None:
    run = EvaluationRun.model_validate({
        "run_id": "r", "tenant": "t", "spec": _request_spec().model_dump(),
        "state": "running", "created_at": 0.0, "updated_at": 0.0, "started_at": 10.0,
        "progress": [{"task": "gsm8k", "done": 3, "total": 12, "failed": 0}],
        "percent": 30.0, "eta_s": 40.0, "progress_at": 50.0,
    })
    out = overall_progress(run, now=60.0)
    assert (out.percent, out.count, out.elapsed_s, out.eta_s) == (30.0, "3/12", 50.0, 30.0)
    suspended = run.model_copy(update={"state": RunState.SUSPENDED})
    assert overall_progress(suspended, now=60.0).eta_s is None
