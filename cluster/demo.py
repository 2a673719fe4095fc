"""``make run``: measure local nodes end to end and print the leaderboard.

Starts the embedded stores, loads the shipped datasets, starts local nodes, registers
them, runs the measuring loop on a local Ray cluster until every buffer is full, and
prints the scores. Until the Serve LLM node lands (issue #3) the local nodes are the
project's test nodes: one answering correctly, one answering wrongly, one faulty.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from cluster.config import Settings
from cluster.models import smollm2_path
from cluster.schemas import Node


def _demo_settings(settings: Settings, target: int) -> Settings:
    manager = settings.manager.model_copy(update={
        "target_samples": target, "tick_s": 1.0, "backoff_base_s": 2.0, "backoff_max_s": 10.0,
        "redrive_after_s": 30.0,
    })
    return settings.model_copy(update={"manager": manager})


async def _register(settings: Settings, nodes: list[Node]) -> None:
    from cluster.runtime import StoreConnections

    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        await mongo.ensure_indexes()
        for node in nodes:
            if await mongo.nodes.get(node.node_id) is not None:
                await mongo.nodes.remove(node.node_id)
            await mongo.nodes.add(node)
    finally:
        await conns.close()


def run_demo(settings: Settings, target: int = 20, timeout_s: float = 1200.0) -> int:
    from cluster.bootstrap import stores_running
    from cluster.cli import fetch_scores, format_scores, load_datasets, run_loop
    from cluster.testnode import NodeBehaviour, TestNode

    settings = _demo_settings(settings, target)
    tokenizer = str(smollm2_path(settings.cache_dir))
    started: list[Any] = []
    t0 = time.monotonic()
    with stores_running(settings, publish=True) as s:
        print(f"stores: postgres {s.stores.postgres_url}, mongo {s.stores.mongo_url}", flush=True)
        for r in asyncio.run(load_datasets(s)):
            print(f"dataset {r.task}: {r.n_docs} docs ({'loaded' if r.loaded else 'unchanged'})")
        behaviours = {
            "node-correct": NodeBehaviour(mode="correct"),
            "node-wrong": NodeBehaviour(mode="wrong"),
            "node-faulty": NodeBehaviour(mode="correct", error_rate=0.1, invalid_json_rate=0.05,
                                         hang_rate=0.02, seed=7),
        }
        nodes = []
        try:
            for node_id, behaviour in behaviours.items():
                server = TestNode(behaviour, tokenizer_path=tokenizer)
                url = server.start_in_thread()
                started.append(server)
                nodes.append(Node(node_id=node_id, url=url, model="smollm2",
                                  api="completions", tokenizer=tokenizer))
                print(f"node {node_id} at {url} ({behaviour.mode})", flush=True)
            # Hangs are cut by the SLA timeout; keep it short for a demo.
            s = s.model_copy(update={"requester": s.requester.model_copy(update={
                "sla": s.requester.sla.model_copy(update={"queue_s": 5.0})})})
            asyncio.run(_register(s, nodes))
            ok = run_loop(s, until_full=True, once=False, timeout_s=timeout_s)
            print()
            print(f"leaderboard after {time.monotonic() - t0:.0f}s "
                  f"({target} samples per node and task):")
            print(format_scores(asyncio.run(fetch_scores(s))))
            return 0 if ok else 1
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            for server in started:
                server.stop()
    sys.stdout.flush()
    return 0
