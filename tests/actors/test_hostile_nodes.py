"""Hostile nodes at the loop level: one loop measures an honest node beside six hostile
ones. Each hostile answer must become a NODE-coded sample carrying its reason, the honest
node must not suffer, and nothing may be lost or duplicated.

(``tests/cluster/nodes/test_requester.py`` proves the single relays; this proves the loop around
them: scoring, buffers, backoff and bookkeeping.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_loop import (
    check_no_loss_no_duplicates,
    collect,
    fault_settings,
    kill_manager,
    node_for,
    register,
    summary_line,
    wait_settled,
)
from fault_report import FaultTable
from hostile import HostileMode, HostileNode

from cluster.cli.loop import run_loop
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections
from cluster.testing.testnode import NodeBehaviour, TestNode

TARGET = 3
HUGE = 100 * 1024 * 1024

# fault → (node id, the test node's behaviour or a hostile mode, words its error must carry)
HOSTILE: dict[str, tuple[str, NodeBehaviour | HostileMode, str]] = {
    "node hangs": ("h-hang", NodeBehaviour(hang_rate=1.0), "timed out after"),
    "node drips slowly": ("h-drip", "drip", "reading the body"),
    "node sends 100 MB": ("h-huge", NodeBehaviour(huge_body_rate=1.0, huge_body_bytes=HUGE),
                          "response exceeded"),
    "node sends invalid JSON": ("h-json", NodeBehaviour(invalid_json_rate=1.0), "invalid JSON"),
    "node sends wrong content type": ("h-html", NodeBehaviour(wrong_content_type_rate=1.0),
                                      "text/html"),
    "node resets connections": ("h-reset", "reset", "before the response"),
}


@pytest.fixture
def hostile_nodes(smollm2_dir: Path) -> Iterator[list[Node]]:
    servers: list[TestNode | HostileNode] = []
    nodes = []
    honest: tuple[str, NodeBehaviour | HostileMode, str] = ("honest", NodeBehaviour(), "")
    for node_id, behaviour, _ in [honest, *HOSTILE.values()]:
        server: TestNode | HostileNode
        if isinstance(behaviour, NodeBehaviour):
            server = TestNode(behaviour, tokenizer_path=str(smollm2_dir))
        else:
            server = HostileNode(behaviour)
        servers.append(server)
        nodes.append(node_for(node_id, server.start_in_thread(), smollm2_dir))
    yield nodes
    for server in servers:
        server.stop()


async def _buffers(settings: Settings) -> dict[str, dict]:
    conns = StoreConnections(settings)
    try:
        return {b["node_id"]: b for b in await (await conns.mongo()).buffers.summaries()}
    finally:
        await conns.close()


@pytest.mark.slow  # ~40 s: a loop start on the session cluster, then 2-5 s per hostile doc
@pytest.mark.fault(*HOSTILE)
def test_hostile_nodes_are_recorded_as_node_errors_and_spare_the_honest_one(
    fresh_settings: Settings, ray_session: None, hostile_nodes: list[Node],
    fault_table: FaultTable,
) -> None:
    kill_manager()
    settings = fault_settings(fresh_settings, TARGET)
    asyncio.run(register(settings, hostile_nodes))
    t0 = time.monotonic()
    try:
        assert run_loop(settings, until_full=True, once=False, timeout_s=240)
        wait_settled(settings)
    finally:
        kill_manager()
    elapsed = time.monotonic() - t0
    data = asyncio.run(collect(settings))
    summary = check_no_loss_no_duplicates(data)
    buffers = asyncio.run(_buffers(settings))

    honest = [s for s in data["samples"] if s["node_id"] == "honest"]
    assert len(honest) >= TARGET and all(s["error_code"] == ErrorCode.OK for s in honest)
    assert buffers["honest"]["error_rate"] == 0.0
    for fault, (node_id, _, reason) in HOSTILE.items():
        samples = [s for s in data["samples"] if s["node_id"] == node_id]
        assert len(samples) >= TARGET, (fault, samples)
        assert all(s["error_code"] == ErrorCode.NODE for s in samples), (fault, samples)
        assert all(reason in (s["error"] or "") for s in samples), (fault, samples[0]["error"])
        assert buffers[node_id]["error_rate"] == 1.0 and buffers[node_id]["n"] >= TARGET
        relays = [r for r in data["relays"] if r["node_id"] == node_id]
        error = (samples[0]["error"] or "").removeprefix("#0: ")
        fault_table.record(fault, (
            f"{len(samples)} samples, all `node` (buffer error rate 1.0), {len(relays)} relays; "
            f"\"{error[:80]}\""))
    fault_table.note("hostile nodes, one loop with an honest node beside them: " + summary_line(
        summary, f"the honest node all `ok`; buffers full in {elapsed:.0f} s"))
