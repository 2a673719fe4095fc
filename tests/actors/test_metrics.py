"""The loop's Ray metrics reach the Ray metrics endpoint (Prometheus text), with labels.

A short loop on the session cluster against a correct node and one that answers garbage,
then a scrape of every node's metrics agent until the ``ray_testbench_*`` series show up
(each worker reports every ``metrics_report_interval_ms``, 10 s by default).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import record_verdict
from actors.remote import MANAGER_NAME
from cluster.cli.loop import run_loop
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections
from cluster.testing.testnode import NodeBehaviour, TestNode

TASK = "gsm8k"
Labels = dict[str, str]


@pytest.fixture(scope="module")
def metric_nodes(smollm2_dir: Path) -> Iterator[list[Node]]:
    servers = {
        "metrics-ok": TestNode(NodeBehaviour(mode="correct"), tokenizer_path=str(smollm2_dir)),
        "metrics-garbage": TestNode(NodeBehaviour(invalid_json_rate=1.0),
                                    tokenizer_path=str(smollm2_dir)),
    }
    nodes = [Node(node_id=nid, url=server.start_in_thread(), model="smollm2",
                  tokenizer=str(smollm2_dir), tasks=[TASK]) for nid, server in servers.items()]
    yield nodes
    for server in servers.values():
        server.stop()


def _kill_manager() -> None:
    try:
        ray.kill(ray.get_actor(MANAGER_NAME, namespace="testbench"), no_restart=True)
    except ValueError:
        pass


async def _register(settings: Settings, nodes: list[Node]) -> None:
    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        for node in nodes:
            await mongo.nodes.add(node)
    finally:
        await conns.close()


def scrape() -> dict[str, list[Labels]]:
    """Sample name → label sets, over every alive Ray node's metrics endpoint."""
    out: dict[str, list[Labels]] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_testbench_"):
                    out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def has(series: dict[str, list[Labels]], name: str, **labels: str) -> bool:
    return any(labels.items() <= s.items() for s in series.get(name, []))


@pytest.mark.slow  # ~40 s here: a loop on the session cluster, then up to 2 report intervals
def test_loop_metrics_are_exported_with_their_labels(
    fresh_settings: Settings, ray_session: None, metric_nodes: list[Node]
) -> None:
    _kill_manager()
    settings = fresh_settings.model_copy(update={
        "tasks": [TASK],
        "manager": fresh_settings.manager.model_copy(update={
            "target_samples": 2, "max_in_flight": 2, "tick_s": 0.5, "node_refresh_s": 0.0}),
    })
    asyncio.run(_register(settings, metric_nodes))
    try:
        assert run_loop(settings, until_full=True, once=False, timeout_s=240)
        record_verdict("identity", "fail")  # the driver is a Ray worker too: it exports
        # Scraped while the actors live: a dead worker's series may vanish with it.
        missing = _wait_for(EXPECTED, timeout_s=60)
    finally:
        _kill_manager()
    assert not missing, f"missing series {missing}"


EXPECTED: list[tuple[str, Labels]] = [
    ("ray_testbench_relays_total", {"node_id": "metrics-ok", "error_code": "ok"}),
    ("ray_testbench_relays_total", {"node_id": "metrics-garbage", "error_code": "node"}),
    ("ray_testbench_relay_latency_seconds_bucket", {"error_code": "ok", "le": "+Inf"}),
    ("ray_testbench_relay_latency_seconds_count", {"error_code": "node"}),
    ("ray_testbench_samples_total", {"node_id": "metrics-ok", "task": TASK, "error_code": "ok"}),
    ("ray_testbench_samples_total",
     {"node_id": "metrics-garbage", "task": TASK, "error_code": "node"}),
    ("ray_testbench_requester_prompts_pending", {}),
    ("ray_testbench_requester_requests_in_flight", {}),
    ("ray_testbench_manager_samples_in_flight", {}),
    ("ray_testbench_manager_samples_planned", {}),
    ("ray_testbench_manager_samples_redriven", {}),
    ("ray_testbench_verdicts_total", {"check": "identity", "outcome": "fail"}),
]


def _wait_for(expected: list[tuple[str, Labels]], timeout_s: float) -> list[tuple[str, Labels]]:
    """What is still missing from the endpoints when all showed up or time ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        series = scrape()
        missing = [(name, labels) for name, labels in expected
                   if not has(series, name, **labels)]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(2)
