"""What the fault-injection tests share: loop settings, test nodes, the state the loop left
in MongoDB, and the invariants every fault must leave intact.

Imported by the tests of this directory as ``fault_loop`` (pytest puts the directory on
``sys.path``), and by ``node_loss_script.py``, which runs outside pytest.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path
from typing import Any

import ray

from actors.remote import MANAGER_NAME
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node
from cluster.core.settings import EndpointAllowlist, Settings
from cluster.storage.connections import StoreConnections
from cluster.testing.testnode import NodeBehaviour, TestNode

TASK = "gsm8k"  # generate_until: one request per doc, the cheapest to build and score


def fault_settings(base: Settings, target: int, **manager: Any) -> Settings:
    """A fast loop: short ticks and backoffs, SLA timeouts of about 2 s so that a node that
    hangs costs seconds, not the production minutes, and one actor of each kind (each
    restart reloads lm-eval's task, which is what a small machine spends its time on)."""
    return base.model_copy(update={
        "tasks": [TASK],
        "pools": base.pools.model_copy(update={"samplers": 1, "evaluators": 1}),
        "manager": base.manager.model_copy(update={
            "target_samples": target, "max_in_flight": 4, "tick_s": 0.5,
            "backoff_base_s": 0.5, "backoff_max_s": 2.0, "redrive_after_s": 10.0,
            "node_refresh_s": 0.0, **manager}),
        "requester": base.requester.model_copy(update={
            "retry_backoff_s": 0.1, "connect_timeout_s": 2.0,
            "endpoint_allowlist": EndpointAllowlist.loopback(),  # the test nodes' loopback
            "sla": base.requester.sla.model_copy(update={
                "queue_s": 2.0, "per_output_token_s": 0.0, "max_timeout_s": 5.0})}),
    })


def start_nodes(behaviours: dict[str, NodeBehaviour], tokenizer: Path
                ) -> tuple[list[TestNode], list[Node]]:
    servers, nodes = [], []
    for node_id, behaviour in behaviours.items():
        server = TestNode(behaviour, tokenizer_path=str(tokenizer))
        servers.append(server)
        nodes.append(node_for(node_id, server.start_in_thread(), tokenizer))
    return servers, nodes


def node_for(node_id: str, url: str, tokenizer: Path) -> Node:
    return Node(node_id=node_id, url=url, model="smollm2", tokenizer=str(tokenizer),
                tasks=[TASK])


async def register(settings: Settings, nodes: list[Node]) -> None:
    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        for node in nodes:
            await mongo.nodes.add(node)
    finally:
        await conns.close()


async def collect(settings: Settings) -> dict[str, Any]:
    conns = StoreConnections(settings)
    try:
        db = (await conns.mongo()).db
        return {
            "prompts": await db["prompts"].find(
                {}, {"_id": 1, "sample_key": 1, "_done": 1}).to_list(None),
            "relays": await db["relays"].find(
                {}, {"_id": 1, "node_id": 1, "error_code": 1, "error": 1}).to_list(None),
            "samples": await db["samples"].find({}).to_list(None),
        }
    finally:
        await conns.close()


def check_no_loss_no_duplicates(data: dict[str, Any]) -> dict[str, Any]:
    """Every prompt has exactly one relay and its sample; one sample per (node, task, doc,
    epoch) and per (node, task, doc) in the window. Returns a summary for the report."""
    prompt_ids = [p["_id"] for p in data["prompts"]]
    relay_ids = [r["_id"] for r in data["relays"]]
    assert len(prompt_ids) == len(set(prompt_ids)), "a prompt was written twice"
    assert sorted(relay_ids) == sorted(prompt_ids), "a prompt lacks its relay, or has two"
    sample_keys = [s["_id"] for s in data["samples"]]
    assert len(sample_keys) == len(set(sample_keys))
    assert {p["sample_key"] for p in data["prompts"]} == set(sample_keys), \
        "a prompt's sample is missing, or a sample has no prompt"
    per_doc = collections.Counter((s["node_id"], s["task"], s["doc_id"]) for s in data["samples"])
    assert max(per_doc.values(), default=0) <= 1, "a (node, task, doc) was sampled twice"
    codes = collections.Counter(ErrorCode(s["error_code"]).name.lower() for s in data["samples"])
    return {"prompts": len(prompt_ids), "relays": len(relay_ids),
            "samples": len(sample_keys), "codes": dict(sorted(codes.items()))}


def summary_line(summary: dict[str, Any], extra: str = "") -> str:
    codes = " ".join(f"{k}={v}" for k, v in summary["codes"].items())
    line = (f"{summary['samples']} samples, {summary['prompts']} prompts = "
            f"{summary['relays']} relays, none lost or duplicated; codes {codes}")
    return f"{line}; {extra}" if extra else line


def kill_manager() -> None:
    try:
        ray.kill(ray.get_actor(MANAGER_NAME, namespace="testbench"), no_restart=True)
    except ValueError:
        pass


def manager_status(manager: Any) -> dict[str, Any]:
    return ray.get(manager.status.remote(), timeout=60)


def wait_for_samples(manager: Any, at_least: int, timeout_s: float,
                     node_id: str | None = None) -> float:
    """Seconds until the Manager holds ``at_least`` samples: absorbed since it (re)started,
    or valid in the buffer of ``node_id``."""
    t0 = time.monotonic()
    while True:
        try:
            status = manager_status(manager)
            if node_id is None:
                have = status["samples"]
            else:
                have = sum(p["valid"] for p in status["pairs"] if p["node_id"] == node_id)
            if have >= at_least:
                return time.monotonic() - t0
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # restarting: the handle answers again once it is back
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"fewer than {at_least} samples after {timeout_s:.0f} s")
        time.sleep(0.3)


def actor_pid(actor: Any) -> int:
    return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=120))


def wait_for_restart(actor: Any, old_pid: int, timeout_s: float = 240) -> float:
    """Seconds until ``actor`` answers from a process other than ``old_pid``."""
    t0 = time.monotonic()
    while True:
        try:
            if actor_pid(actor) != old_pid:
                return time.monotonic() - t0
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not restarted after {timeout_s:.0f} s")
        time.sleep(0.3)


def wait_settled(settings: Settings, timeout_s: float = 120) -> None:
    """Until no prompt waits for its sample (the loop drained what it dispatched)."""
    async def pending() -> int:
        conns = StoreConnections(settings)
        try:
            db = (await conns.mongo()).db
            return await db["prompts"].count_documents({"_done": 0})
        finally:
            await conns.close()

    deadline = time.monotonic() + timeout_s
    while (left := asyncio.run(pending())) > 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{left} prompts still pending after {timeout_s:.0f} s")
        time.sleep(0.5)
