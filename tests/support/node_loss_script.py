"""A multi-node Ray cluster losing the node that runs the loop (run by test_node_loss.py).

Runs as its own process, because ``ray.cluster_utils.Cluster`` needs a driver of its own
and the pytest process is already the driver of the session's cluster. The caller sets
``RAY_TMPDIR`` to a private directory: the Cluster records its address there, where no
other ``ray.init()`` on the machine looks.

1. a head and one worker node; the detached Manager is pinned to the worker (soft
   affinity, so that it may restart elsewhere) and creates its children there too;
2. once samples flow, the worker node is removed (its processes killed, no grace);
3. the Manager restarts on the head, rebuilds from MongoDB and re-drives what was pending;
   the loop then fills every buffer.

Usage: ``python node_loss_script.py SETTINGS_JSON TOKENIZER_DIR``; the last line printed is
``RESULT {json}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import ray
from fault_loop import (
    actor_pid,
    check_no_loss_no_duplicates,
    collect,
    kill_manager,
    node_for,
    register,
    start_nodes,
    wait_for_restart,
    wait_for_samples,
    wait_settled,
)
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.remote import MANAGER_NAME, ManagerActor
from cluster.cli.loop import run_loop
from cluster.core.settings import Settings
from cluster.testing.testnode import NodeBehaviour

T0 = time.monotonic()


def say(what: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {what}", flush=True)


def node_of(actor: Any) -> str:
    return ray.get(actor.__ray_call__.remote(
        lambda _self: ray.get_runtime_context().get_node_id()), timeout=60)


def placement(manager: Any) -> dict[str, list[str]]:
    children = ray.get(manager.children.remote(), timeout=120)
    return {
        "manager": [node_of(manager)],
        "samplers": [node_of(a) for a in children["samplers"]],
        "evaluators": [node_of(a) for a in children["evaluators"]],
        "requester": [node_of(children["requester"])],
    }


def manager_on(node_id: str, settings: Settings, attempts: int = 10) -> Any:
    """The detached Manager, started on ``node_id``.

    Soft affinity, so that it may restart elsewhere once that node is gone; but soft
    affinity also falls back to another node while the head's scheduler does not see the
    new node yet, so placement is checked and retried.
    """
    for _ in range(attempts):
        manager = ManagerActor.options(
            name=MANAGER_NAME, namespace=settings.ray.namespace, lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True),
        ).remote(settings)
        if node_of(manager) == node_id:
            return manager
        ray.kill(manager, no_restart=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until its name is free again
            try:
                ray.get_actor(MANAGER_NAME, namespace=settings.ray.namespace)
            except ValueError:
                break
            time.sleep(0.5)
    raise AssertionError(f"the Manager never landed on node {node_id}")


def run(settings: Settings, tokenizer: Path) -> dict[str, Any]:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False,
        # Declare a silent node dead after ~3 s rather than Ray's default ~15-30 s.
        "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                           "health_check_failure_threshold": 3}})
    servers = []
    try:
        worker = cluster.add_node(num_cpus=2)
        say("cluster up: head and one worker")
        ray.init(address=cluster.address, namespace=settings.ray.namespace, log_to_driver=False)
        servers, nodes = start_nodes({
            "nl-steady": NodeBehaviour(latency_s=0.1),
            "nl-flaky": NodeBehaviour(latency_s=0.1, error_rate=0.25, seed=11),
        }, tokenizer)
        asyncio.run(register(settings, nodes))
        manager = manager_on(worker.node_id, settings)
        ray.get(manager.ensure_started.remote(), timeout=240)
        before = placement(manager)
        say(f"loop up; worker {worker.node_id}; placement: {before}")
        wait_for_samples(manager, 3, timeout_s=240)

        pid = actor_pid(manager)
        t0 = time.monotonic()
        say("samples flow; removing the worker node")
        cluster.remove_node(worker, allow_graceful=False)
        # Work that can only be done after the loss, however far the rest had got.
        late = node_for("nl-late", servers[0].base_url or "", tokenizer)
        asyncio.run(register(settings, [late]))
        # Until the GCS declares the node dead (missed health checks), the old Manager's
        # process may still answer: wait for the new one before asking anything.
        wait_for_restart(manager, pid, timeout_s=300)
        say("Manager restarted")
        wait_for_samples(manager, 2, timeout_s=240, node_id=late.node_id)
        recovered_s = time.monotonic() - t0
        after = placement(manager)
        say(f"the late node measured; placement: {after}")
        redriven = ray.get(manager.status.remote(), timeout=60)["redriven"]

        t0 = time.monotonic()
        full = run_loop(settings, until_full=True, once=False, timeout_s=300)
        wait_settled(settings)
        summary = check_no_loss_no_duplicates(asyncio.run(collect(settings)))
        return {
            "worker": worker.node_id, "head": cluster.head_node.node_id,
            "before": before, "after": after, "recovered_s": recovered_s,
            "redriven": redriven, "full": full, "filled_s": time.monotonic() - t0,
            "summary": summary,
        }
    finally:
        if ray.is_initialized():
            kill_manager()
        for server in servers:
            server.stop()
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    settings = Settings.model_validate_json(sys.argv[1])
    result = run(settings, Path(sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
