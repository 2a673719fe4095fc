"""One measuring loop, hit by one fault after another: each actor kind killed, then its
PostgreSQL and its MongoDB stopped and restarted. After each fault the loop must make
progress again by itself; at the end it must fill every buffer with nothing lost or
duplicated.

The loop runs on the session's Ray cluster but on a pair of stores of its own (a restart
comes back on the same port, where the clients look), leaving the
session's stores untouched. One loop for all faults: starting a loop (actor processes,
lm-eval task loading) is the expensive part on a small machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from fault_loop import (
    actor_pid,
    check_no_loss_no_duplicates,
    collect,
    fault_settings,
    kill_manager,
    manager_status,
    register,
    start_nodes,
    summary_line,
    wait_for_restart,
    wait_for_samples,
    wait_settled,
)
from fault_report import FaultTable

from actors.remote import get_or_create_manager
from cluster.cli.loop import run_loop
from cluster.core.schemas import Node
from cluster.core.settings import Settings, StoreSettings
from cluster.local.embedded import EmbeddedMongo, EmbeddedPostgres
from cluster.tasks.datasets import load_datasets
from cluster.testing.testnode import NodeBehaviour

TARGET = 4
PG_DOWN_S = 6.0
MONGO_DOWN_S = 12.0  # past the Mongo client's 10 s server selection: calls fail, not wait
PROGRESS = 2  # samples that prove the loop moves again


class OwnStores:
    def __init__(self, data_dir: Path) -> None:
        # No fixed port: the first start retries past a port taken meanwhile (Ray opens
        # many); restarts reuse the port, so the loop's URLs stay valid across the fault.
        self.postgres = EmbeddedPostgres(data_dir)
        self.mongo = EmbeddedMongo(data_dir)
        self.settings = StoreSettings(data_dir=data_dir, postgres_url=self.postgres.start(),
                                      mongo_url=self.mongo.start(), mongo_database="faults")

    def stop(self) -> None:
        self.mongo.stop()
        self.postgres.stop()


@pytest.fixture
def own_stores(tmp_path: Path) -> Iterator[OwnStores]:
    stores = OwnStores(tmp_path / "stores")
    try:
        asyncio.run(load_datasets(Settings(stores=stores.settings), ["gsm8k"]))
        yield stores
    finally:
        stores.stop()


@pytest.fixture
def nodes(smollm2_dir: Path) -> Iterator[list[Node]]:
    # Latency keeps relays in flight when an actor dies; the failing node adds node errors.
    # It answers 500 to every attempt: at a lower rate, whether any relay fails all of the
    # Requester's retries depends on the docs drawn, which change with the TTL epoch (at
    # 0.25 the test passed or failed by the hour of the day).
    servers, registered = start_nodes({
        "f-steady": NodeBehaviour(latency_s=0.2),
        "f-failing": NodeBehaviour(latency_s=0.2, error_rate=1.0, seed=7),
    }, smollm2_dir)
    yield registered
    for server in servers:
        server.stop()


def fresh_work(settings: Settings, steady: Node, fault: str) -> str:
    """Register a node of its own for ``fault`` (the steady server under another id), so
    that work is outstanding when the fault strikes however far the rest has got."""
    node_id = "f-" + fault.split()[0]
    asyncio.run(register(settings, [steady.model_copy(update={"node_id": node_id})]))
    return node_id


def _outage(server: EmbeddedPostgres | EmbeddedMongo, down_s: float, manager: Any,
            node_id: str) -> str:
    errors_before = manager_status(manager)["pipeline_errors"]
    server.stop()
    time.sleep(down_s)
    server.start()
    secs = wait_for_samples(manager, PROGRESS, timeout_s=180, node_id=node_id)
    errors = manager_status(manager)["pipeline_errors"] - errors_before
    return (f"down {down_s:.0f} s; {errors} failed pipeline calls re-driven; "
            f"the new node's first {PROGRESS} samples {secs:.1f} s after the restart")


@pytest.mark.slow  # ~2 min here: six faults, each waiting for the loop to move again
@pytest.mark.fault("sampler killed", "requester killed", "evaluator killed", "manager killed",
                   "postgresql stopped", "mongodb stopped")
def test_the_loop_recovers_from_each_fault_in_turn(
    ray_session: None, own_stores: OwnStores, nodes: list[Node], fault_table: FaultTable
) -> None:
    # One doc in flight per (node, task): a node's docs pass one by one, so a fault lands
    # between its first sample and its last.
    settings = fault_settings(Settings(stores=own_stores.settings), TARGET, max_in_flight=1)
    steady = nodes[0]
    asyncio.run(register(settings, nodes))
    kill_manager()
    manager = get_or_create_manager(settings)
    try:
        ray.get(manager.ensure_started.remote())
        wait_for_samples(manager, PROGRESS, timeout_s=240)

        for kind in ("sampler", "requester", "evaluator"):
            node_id = fresh_work(settings, steady, kind)
            children = ray.get(manager.children.remote())
            actor = children["requester"] if kind == "requester" else children[f"{kind}s"][0]
            wait_for_samples(manager, 1, timeout_s=120, node_id=node_id)  # its work is flowing
            ray.kill(actor, no_restart=False)  # Ray restarts it and retries its calls
            secs = wait_for_samples(manager, 1 + PROGRESS, timeout_s=180, node_id=node_id)
            fault_table.record(f"{kind} killed", f"{PROGRESS} more samples of a node measured "
                                                 f"at the kill {secs:.1f} s after it")

        node_id = fresh_work(settings, steady, "manager")
        wait_for_samples(manager, 1, timeout_s=120, node_id=node_id)
        pid = actor_pid(manager)
        ray.kill(manager, no_restart=False)  # restarts, rebuilds from MongoDB, re-drives
        restart_s = wait_for_restart(manager, pid)
        secs = wait_for_samples(manager, 1 + PROGRESS, timeout_s=240, node_id=node_id)
        st = manager_status(manager)
        fault_table.record("manager killed", (
            f"back in {restart_s:.1f} s, rebuilt from MongoDB, re-drove {st['redriven']} "
            f"pending samples; {PROGRESS} more samples of a node measured at the kill "
            f"{restart_s + secs:.1f} s after it"))

        fault_table.record("postgresql stopped", _outage(
            own_stores.postgres, PG_DOWN_S, manager, fresh_work(settings, steady, "postgresql")))
        fault_table.record("mongodb stopped", _outage(
            own_stores.mongo, MONGO_DOWN_S, manager, fresh_work(settings, steady, "mongodb")))

        t0 = time.monotonic()
        assert run_loop(settings, until_full=True, once=False, timeout_s=300)
        wait_settled(settings)
        filled = time.monotonic() - t0
    finally:
        kill_manager()
    summary = check_no_loss_no_duplicates(asyncio.run(collect(settings)))
    assert summary["samples"] >= 8 * TARGET  # the two nodes and one per fault
    assert summary["codes"].get("node", 0) > 0, "the failing node's errors were recorded"
    fault_table.note("actor kills and store outages, one loop taking them in turn: " + summary_line(
        summary, f"buffers full {filled:.0f} s after the last fault"))
