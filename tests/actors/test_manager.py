"""The Manager as a plain class, with in-process children (no Ray) and real stores."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.local import LocalPipeline
from actors.manager import Manager
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections
from cluster.tasks.lmeval import request_build_stats
from cluster.testing.testnode import NodeBehaviour, TestNode


@pytest.fixture(scope="module")
def correct_node(smollm2_dir: Path) -> Iterator[Node]:
    server = TestNode(NodeBehaviour(mode="correct"), tokenizer_path=str(smollm2_dir))
    url = server.start_in_thread()
    yield Node(node_id="n1", url=url, model="smollm2", tokenizer=str(smollm2_dir))
    server.stop()


def small(settings: Settings, target: int = 4) -> Settings:
    return settings.model_copy(update={
        "tasks": ["openbookqa"],
        "manager": settings.manager.model_copy(update={
            "target_samples": target, "max_in_flight": 2, "tick_s": 0.05, "node_refresh_s": 0}),
    })


async def _until_full(manager: Manager, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await manager.tick()
        status = await manager.status()
        if status["full"]:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"not full in {timeout_s}s: {await manager.status()}")


async def test_manager_fills_buffers_respecting_max_in_flight(
    fresh_settings: Settings, correct_node: Node
) -> None:
    settings = small(fresh_settings)
    stores = StoreConnections(settings)
    mongo = await stores.mongo()
    await mongo.nodes.add(correct_node)
    manager = Manager(settings, LocalPipeline, stores=stores)
    await manager.ensure_started(loop=False)
    plan = manager.plan(time.time())
    assert [(i.node_id, i.task, i.count) for i in plan] == [("n1", "openbookqa", 2)]
    status = await _until_full(manager)
    assert status["pairs"][0]["valid"] >= 4
    summaries = await mongo.buffers.summaries()
    assert summaries[0]["n"] >= 4 and summaries[0]["error_rate"] == 0.0
    assert set(summaries[0]["metrics"]) == {"acc,none", "acc_norm,none"}
    # what building requests cost this process, as the Sampler counts it
    assert (await manager.status(detail=False))["requests_built"] == request_build_stats()
    await manager.stop()


async def test_docs_being_drawn_count_as_in_flight_until_scored(
    fresh_settings: Settings, correct_node: Node
) -> None:
    """``testbench run --once`` ends when a tick happened and nothing is in flight: the
    docs a tick planned are in flight from that moment (while the Sampler draws them),
    not only once drawn, or the run would end before its docs were measured."""
    settings = small(fresh_settings, target=2)  # one tick's docs fill the buffer
    stores = StoreConnections(settings)
    await (await stores.mongo()).nodes.add(correct_node)
    manager = Manager(settings, LocalPipeline, stores=stores)
    await manager.ensure_started(loop=False)
    assert await manager.tick() == 1
    status = await manager.status(detail=False)
    assert status["in_flight"] + status["valid"] == 2, status
    deadline = time.monotonic() + 60
    while status["in_flight"]:
        assert time.monotonic() < deadline, status
        status = await manager.status(detail=False, wait_s=5)
    assert status["valid"] == 2 and status["dispatched"] == 2, status
    await manager.stop()


async def test_restarted_manager_rebuilds_state_and_redrives_orphans(
    fresh_settings: Settings, correct_node: Node
) -> None:
    settings = small(fresh_settings, target=3)
    stores = StoreConnections(settings)
    mongo = await stores.mongo()
    await mongo.nodes.add(correct_node)
    first = Manager(settings, LocalPipeline, stores=StoreConnections(settings))
    await first.ensure_started(loop=False)
    await _until_full(first)
    await first.stop()
    # An orphan: prompts a dead Sampler wrote for doc 499, never relayed or scored.
    pipeline = LocalPipeline(settings)
    from cluster.core.schemas import SampleRequest

    _, prompts = await pipeline.samplers[0].sample(SampleRequest(
        node=correct_node, task="openbookqa", count=1,
        exclude_doc_ids=list(range(499)), epoch=int(time.time() // settings.manager.sample_ttl_s),
        seed=1))
    assert prompts and prompts[0].doc_id == 499
    await pipeline.close()
    second = Manager(settings, LocalPipeline, stores=StoreConnections(settings))
    await second.ensure_started(loop=False)  # rebuild + sweep of everything pending
    status = await second.status()
    assert status["pairs"][0]["valid"] >= 3, "state rebuilt from MongoDB"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if await mongo.samples.count(node_id="n1") >= 4:
            break
        await asyncio.sleep(0.1)
    samples = await mongo.samples.valid_since("n1", "openbookqa", 0)
    assert 499 in {s.doc_id for s in samples}, "the orphaned doc was re-driven and scored"
    assert all(s.error_code == ErrorCode.OK for s in samples)
    assert await mongo.relays.count() == await mongo.prompts.collection.count_documents({})
    await second.stop()
    await stores.close()


async def test_nodes_get_the_tasks_of_their_kind_with_per_task_targets(
    fresh_settings: Settings, correct_node: Node
) -> None:
    settings = fresh_settings.model_copy(update={
        "tasks": ["openbookqa", "gsm8k"], "diffusion_tasks": ["diffusion_repro"],
        "manager": fresh_settings.manager.model_copy(update={
            "target_samples": 5, "task_targets": {"gsm8k": 2, "diffusion_repro": 3},
            "max_in_flight": 10, "node_refresh_s": 0}),
    })
    stores = StoreConnections(settings)
    mongo = await stores.mongo()
    await mongo.nodes.add(correct_node)
    await mongo.nodes.add(Node(node_id="d1", url="http://127.0.0.1:9", model="tiny-diffusion",
                               kind="diffusion"))
    manager = Manager(settings, LocalPipeline, stores=stores)
    await manager.ensure_started(loop=False)
    plan = {(i.node_id, i.task): i.count for i in manager.plan(time.time())}
    assert plan == {("n1", "openbookqa"): 5, ("n1", "gsm8k"): 2, ("d1", "diffusion_repro"): 3}
    targets = {(p["node_id"], p["task"]): p["target"] for p in (await manager.status())["pairs"]}
    assert targets == {("n1", "openbookqa"): 5, ("n1", "gsm8k"): 2, ("d1", "diffusion_repro"): 3}
    await manager.stop()


async def test_a_pair_waiting_on_an_unmeasurable_prerequisite_is_reported_and_settles(
    fresh_settings: Settings, correct_node: Node
) -> None:
    """A node whose identity signature cannot be measured never gets benchmark traffic
    (task_dependencies): its benchmark pair is reported with the reason, so `run
    --until-full` ends instead of waiting forever."""
    settings = fresh_settings.model_copy(update={
        "tasks": ["signature", "openbookqa"],
        "manager": fresh_settings.manager.model_copy(update={"tick_s": 0.05,
                                                            "node_refresh_s": 0})})
    stores = StoreConnections(settings)
    mongo = await stores.mongo()
    await mongo.nodes.add(correct_node)
    manager = Manager(settings, LocalPipeline, stores=stores)
    await manager.ensure_started(loop=False)
    manager._state("n1", "signature").unmeasurable = "no signature route (test)"
    status = await manager.status(detail=False)
    reasons = {(p["node_id"], p["task"]): p["reason"] for p in status["unmeasurable_pairs"]}
    assert reasons[("n1", "signature")] == "no signature route (test)"
    assert reasons[("n1", "openbookqa")] == (
        "waits for signature, which cannot be measured: no signature route (test)")
    assert status["settled"] and not status["full"]
    await manager.stop()


async def test_status_with_wait_returns_on_progress_and_waits_while_nothing_changes(
    fresh_settings: Settings, correct_node: Node
) -> None:
    """The long poll ``testbench run`` follows the loop with: an answer as soon as
    something changes, none several times a second while nothing does."""
    base = small(fresh_settings)
    settings = base.model_copy(update={  # after the buffer fills, nothing for 60 s
        "manager": base.manager.model_copy(update={"tick_s": 60.0})})
    stores = StoreConnections(settings)
    await (await stores.mongo()).nodes.add(correct_node)
    manager = Manager(settings, LocalPipeline, stores=stores)
    status = await manager.status(detail=False)  # starts the loop
    calls, deadline = 0, time.monotonic() + 60
    while not status["full"]:
        assert time.monotonic() < deadline, status
        started = time.monotonic()
        status = await manager.status(detail=False, wait_s=20)
        calls += 1
        assert time.monotonic() - started < 10, "a waiting status missed the loop's progress"
    assert calls >= 2 and status["valid"] == 4
    # the last changes, if any: the scoring of the final docs may still be finishing on a
    # loaded machine; then nothing changes until the next tick, 60 s away
    quiet_at = time.monotonic() + 20
    while True:
        started = time.monotonic()
        await manager.status(detail=False, wait_s=0.2)
        if time.monotonic() - started >= 0.19:
            break
        assert time.monotonic() < quiet_at, "the loop keeps reporting progress while full"
    started = time.monotonic()
    quiet = await manager.status(detail=False, wait_s=0.5)
    assert time.monotonic() - started >= 0.45 and quiet["valid"] == 4
    await manager.stop()


async def test_the_manager_tops_a_busy_node_up_in_batches_of_refill_docs(
    fresh_settings: Settings, correct_node: Node
) -> None:
    settings = small(fresh_settings, target=40)
    settings = settings.model_copy(update={"manager": settings.manager.model_copy(
        update={"max_in_flight": 8, "refill_docs": 4})})
    stores = StoreConnections(settings)
    await (await stores.mongo()).nodes.add(correct_node)
    manager = Manager(settings, LocalPipeline, stores=stores)
    await manager.ensure_started(loop=False)
    try:
        state = manager._state("n1", "openbookqa")
        state.in_flight = state.at_node = set(range(5))  # 3 free of 8: waits
        assert manager.plan(time.time()) == []
        state.in_flight = state.at_node = set(range(4))  # 4 free: they go together
        assert [(i.node_id, i.task, i.count) for i in manager.plan(time.time())] == [
            ("n1", "openbookqa", 4)]
    finally:
        await stores.close()
