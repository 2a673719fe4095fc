"""A simulated fleet: 1,000 test nodes on loopback, measured by the real loop until every
buffer is full, against the Requester alone on the same fleet in the same run.

The nodes: one test-node app (``cluster.testing.testnode``'s routes and fake model) in a server
process of its own, answering each node under its own path, ``http://127.0.0.1:P/n<i>``,
so a thousand nodes cost one port and one process. Stores: fresh embedded PostgreSQL and
MongoDB. Task: gsm8k (generation), buffers of ``--target`` docs.

1. **Anchor, the Requester alone**: the same prompts the loop will send (``--target``
   docs per node, built by the loop's own task adapter), relayed by
   ``cluster.nodes.requester.Requester`` with the loop's requester settings, in this
   process, recording nothing: the rate the fleet and the HTTP client allow.
2. **The loop** (the real detached Manager with its Ray children on a fresh local Ray
   instance): one node is registered first and measured until full, so the children are
   warm (lm-eval, task and tokenizer loaded); then the other nodes join the registry, as
   nodes join a validator's running loop, and the loop fills their buffers. The window runs
   from their registration to the last buffer full.

Printed: the loop's relays/s and its ratio to the anchor; CPU-ms per relay of the loop's
actors and of the stores (MongoDB + PostgreSQL), each over the window; the fleet server's;
the part of the actors' figure that built the requests of docs the loop had not seen yet
(the Manager's ``status()["requests_built"]``); and the idle cost once every buffer is full. Goals: >= 300 relays/s, >= 0.25x the
Requester alone, actors + stores <= 3 CPU-ms per relay; met only when every buffer is full
and every relay of both runs is ok.

    .venv/bin/python bench/sim_nodes.py [--nodes 1000] [--target 3] [--idle-s 15]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASK = "gsm8k"


def serve_nodes(port: int, tokenizer: str, ready: Any) -> None:
    """The fleet's server process: one test-node app under ``/{node}/v1/...`` paths."""
    from aiohttp import web

    from cluster.testing.testnode import NodeBehaviour
    from cluster.testing.testnode.server import NodeApp

    node_app = NodeApp(NodeBehaviour(mode="correct"), tokenizer, "smollm2")
    app = node_app.build()
    app.router.add_post("/{node}/v1/completions", node_app.completions)
    app.router.add_post("/{node}/v1/chat/completions", node_app.chat_completions)
    ready.put(os.getpid())
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                handler_cancellation=True, backlog=4096)


@dataclass
class Window:
    """CPU seconds per actor kind and relays over a stretch of wall time."""

    wall_s: float
    relays: int
    cpu_s: dict[str, float]
    peak_relays_s: float  # the best 10 s stretch: the relay stage before scoring catches up
    built: dict[str, float]  # docs whose requests were built in the window, and their CPU s

    @property
    def cores(self) -> float:
        """Cores the loop's actors used (the stores and the simulated nodes apart)."""
        return sum(v for k, v in self.cpu_s.items() if k in ACTORS) / self.wall_s

    def group_cores(self, kind: str) -> float:
        return self.cpu_s.get(kind, 0.0) / self.wall_s


class CpuMeter:
    """CPU seconds (user + system) per group of processes, children included (PostgreSQL
    serves each connection from a child of its postmaster)."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        import psutil

        self.procs = {kind: [psutil.Process(p) for p in ps] for kind, ps in pids.items()}

    def snapshot(self) -> dict[str, float]:
        import psutil

        out = {}
        for kind, procs in self.procs.items():
            total = 0.0
            for proc in procs:
                try:
                    for q in [proc, *proc.children(recursive=True)]:
                        total += sum(q.cpu_times()[:2])
                except psutil.NoSuchProcess:
                    continue
            out[kind] = total
        return out


def actor_pids(manager: Any) -> dict[str, list[int]]:
    import ray

    def pid(actor: Any) -> int:
        return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid())))

    # Samplers and Evaluators of their own only with pools above 0; by default the
    # Manager's process draws and scores, and its figure holds theirs.
    children = ray.get(manager.children.remote())
    pids = {"manager": [pid(manager)], "samplers": [pid(a) for a in children["samplers"]],
            "evaluators": [pid(a) for a in children["evaluators"]],
            "requester": [pid(children["requester"])]}
    return {kind: found for kind, found in pids.items() if found}


def relays_so_far(manager: Any) -> int:
    import ray

    children = ray.get(manager.children.remote())
    return int(ray.get(children["requester"].stats.remote())["relays"])


def measure(manager: Any, cpu: CpuMeter, until_full: bool, timeout_s: float,
            fixed_s: float | None = None, pairs: int = 0, status_target: int = 0
            ) -> tuple[Window, bool]:
    """Watch until every buffer of at least ``pairs`` pairs is full (or for ``fixed_s``);
    the window's figures."""
    import ray

    t0, r0, c0 = time.monotonic(), relays_so_far(manager), cpu.snapshot()
    b0 = ray.get(manager.status.remote(detail=False))["requests_built"]
    full = False
    last = (t0, r0)
    peak = 0.0
    while True:
        time.sleep(0.2)
        now = time.monotonic()
        status = ray.get(manager.status.remote(detail=False))
        # every pair seen (target of the pairs counted so far) and full
        full = status["full"] and status["target"] >= pairs * status_target
        if now - last[0] >= 5:
            relays = relays_so_far(manager)
            peak = max(peak, (relays - last[1]) / (now - last[0]))
            last = (now, relays)
            valid, target = status["valid"], status["target"]
            print(f"  [{now - t0:6.1f}s] samples {valid}/{target}, relays {relays - r0}",
                  flush=True)
        if (until_full and full) or (fixed_s is not None and now - t0 >= fixed_s):
            break
        if now - t0 > timeout_s:
            break
    c1 = cpu.snapshot()
    b1 = status["requests_built"]
    window = Window(time.monotonic() - t0, relays_so_far(manager) - r0,
                    {k: c1[k] - c0[k] for k in c0}, peak, {k: b1[k] - b0[k] for k in b0})
    return window, full


ACTORS = ("manager", "samplers", "evaluators", "requester")
STORES = ("mongodb", "postgresql")


def fleet(base_url: str, n: int, tokenizer: str) -> list[Any]:
    from cluster.core.schemas import Node

    return [Node(node_id=f"n{i}", url=f"{base_url}/n{i}", model="smollm2", tokenizer=tokenizer,
                 tasks=[TASK]) for i in range(n)]


async def register(settings: Any, nodes: list[Any]) -> None:
    from cluster.storage.connections import open_mongo

    async with open_mongo(settings) as mongo:
        # one bulk insert: a thousand single registrations would time the store, not the loop
        await mongo.nodes.add_many(nodes)


async def anchor_requester(settings: Any, nodes: list[Any], docs_per_node: int
                           ) -> tuple[int, float, float, int]:
    """The Requester alone on the loop's own prompts: (relays, seconds, CPU s, not ok)."""
    from cluster.core.errors import ErrorCode
    from cluster.core.schemas import sample_key
    from cluster.nodes.requester import Requester
    from cluster.storage.connections import open_datasets
    from cluster.tasks.registry import load_adapter

    adapter = load_adapter(TASK, settings.datasets_dir, nodes[0])
    async with open_datasets(settings) as store:
        ids = (await store.doc_ids(TASK, adapter.eval_split))[:docs_per_node]
        docs = await store.fetch_docs(TASK, adapter.eval_split, ids)
    now = time.time()
    prompts = [p for node in nodes for d in ids
               for p in adapter.build_prompts(node, d, docs[d],
                                              sample_key(node.node_id, TASK, d, 0), now)]
    by_id = {n.node_id: n for n in nodes}
    requester = Requester(settings.requester)
    try:
        await requester.relay(prompts[:50], by_id)  # connections up, as the loop's are
        cpu0, t0 = time.process_time(), time.perf_counter()
        relays = await requester.relay(prompts, by_id)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await requester.close()
    return len(relays), wall, cpu, sum(r.error_code != ErrorCode.OK for r in relays)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--target", type=int, default=3, help="buffer size per (node, task)")
    ap.add_argument("--idle-s", type=float, default=15.0, help="steady-state window once full")
    ap.add_argument("--loop-cpu-policy", default=None,
                    choices=["idle", "batch", "normal"],
                    help="the loop processes' CPU policy (ray.loop_cpu_policy; default: the loop's)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()

    import ray

    from actors.remote import get_or_create_manager
    from cluster.core.settings import EndpointAllowlist, Settings, StoreSettings
    from cluster.local.embedded import EmbeddedStores, free_port
    from cluster.local.models import prepare_smollm2
    from cluster.storage.connections import open_mongo
    from cluster.tasks.datasets import load_datasets

    tokenizer = str(prepare_smollm2(ROOT / ".cache"))
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    port = free_port()
    server = ctx.Process(target=serve_nodes, args=(port, tokenizer, ready), daemon=True)
    server.start()
    ready.get(timeout=120)
    data_dir = Path(tempfile.mkdtemp(prefix="sim-nodes-"))
    # the stores testbench run starts for the loop: under the loop's CPU policy
    loop_cpu_policy = args.loop_cpu_policy or Settings().ray.loop_cpu_policy
    embedded = EmbeddedStores(StoreSettings(data_dir=data_dir), cpu_policy=loop_cpu_policy)
    nodes = fleet(f"http://127.0.0.1:{port}", args.nodes, tokenizer)
    with embedded as stores:
        base = Settings(stores=stores)
        settings = base.model_copy(update={
            "tasks": [TASK],
            "ray": base.ray.model_copy(update={
                "loop_cpu_policy": loop_cpu_policy}),
            "manager": base.manager.model_copy(update={
                "target_samples": args.target, "max_in_flight": args.target,
                "tick_s": 1.0, "node_refresh_s": 1.0}),
            "requester": base.requester.model_copy(update={
                "global_concurrency": 128, "per_node_concurrency": 4,
                "endpoint_allowlist": EndpointAllowlist.loopback()}),  # the local fleet
        })
        asyncio.run(load_datasets(settings, [TASK]))
        anchor_n, anchor_s, anchor_cpu, anchor_bad = asyncio.run(
            anchor_requester(settings, nodes[1:], args.target))
        anchor_rate = anchor_n / anchor_s
        anchor_ms = 1000 * anchor_cpu / anchor_n
        print(f"anchor, the Requester alone: {anchor_n} relays in {anchor_s:.2f} s = "
              f"{anchor_rate:.0f} relays/s ({anchor_ms:.2f} CPU-ms per relay in the client, "
              f"{anchor_bad} not ok)", flush=True)
        asyncio.run(register(settings, nodes[:1]))
        # address="local": a fresh instance, never a cluster someone else started here
        ray.init(address="local", num_cpus=4, namespace=settings.ray.namespace,
                 include_dashboard=False, log_to_driver=False)
        try:
            t_start = time.monotonic()
            manager = get_or_create_manager(settings)
            ray.get(manager.ensure_started.remote())
            while not ray.get(manager.status.remote(detail=False))["full"]:
                time.sleep(0.2)
            warm_s = time.monotonic() - t_start
            groups = actor_pids(manager)
            groups["mongodb"] = [p for p in [embedded.mongo and embedded.mongo.pid] if p]
            groups["postgresql"] = [p for p in [embedded.postgres and embedded.postgres.pid] if p]
            groups["nodes"] = [server.pid] if server.pid else []
            cpu = CpuMeter(groups)
            print(f"loop up and warm in {warm_s:.1f} s (one node measured); "
                  f"{args.nodes - 1} more join: filling their buffers of {args.target}",
                  flush=True)
            asyncio.run(register(settings, nodes[1:]))
            fill, full = measure(manager, cpu, until_full=True, timeout_s=args.timeout,
                                 pairs=args.nodes, status_target=args.target)
            idle, _ = measure(manager, cpu, until_full=False, timeout_s=args.idle_s + 60,
                              fixed_s=args.idle_s)

            async def not_ok() -> int:
                async with open_mongo(settings) as mongo:
                    return await mongo.relays.collection.count_documents(
                        {"error_code": {"$ne": 0}})

            loop_bad = asyncio.run(not_ok())
        finally:
            ray.shutdown()
            server.terminate()
    shutil.rmtree(data_dir, ignore_errors=True)

    rate = fill.relays / fill.wall_s
    ratio = rate / anchor_rate
    per_relay = {k: 1000 * v / max(fill.relays, 1) for k, v in fill.cpu_s.items()}
    actors_ms = sum(per_relay.get(k, 0.0) for k in ACTORS)
    stores_ms = sum(per_relay.get(k, 0.0) for k in STORES)
    print(f"\nsim_nodes: {args.nodes - 1} joining nodes x {TASK}, buffers of {args.target}: "
          f"{'all full' if full else 'NOT full'} in {fill.wall_s:.1f} s")
    print(f"  loop: {fill.relays} relays, {rate:.1f} relays/s = {ratio:.2f}x the Requester "
          f"alone ({anchor_rate:.0f}/s); {loop_bad} relays not ok")
    print("  CPU-ms per relay: " + ", ".join(f"{k} {v:.2f}" for k, v in per_relay.items()))
    print(f"  actors {actors_ms:.2f} + stores {stores_ms:.2f} = {actors_ms + stores_ms:.2f} "
          f"CPU-ms per relay (fleet server {per_relay.get('nodes', 0.0):.2f})")
    # Building a doc's requests (lm-eval's few-shot context, tokenizing it) is paid once per
    # doc the loop has not seen; lm-eval's own client pays it for every doc it runs.
    print(f"  of which building the requests of {fill.built['docs']:.0f} docs not seen "
          f"before: {1000 * fill.built['cpu_s'] / max(fill.relays, 1):.2f} CPU-ms per relay "
          f"({1000 * fill.built['cpu_s'] / max(fill.built['docs'], 1):.2f} ms per doc)")
    idle_actors = sum(idle.group_cores(k) for k in ACTORS)
    idle_stores = sum(idle.group_cores(k) for k in STORES)
    print(f"  idle, every buffer full ({idle.wall_s:.0f} s): actors {idle_actors:.3f} cores, "
          f"stores {idle_stores:.3f} cores")
    from bench_results import report

    ok = full and loop_bad == 0 and anchor_bad == 0
    report("sim_nodes.py", f"relays/s filling {args.nodes - 1:,} joining simulated nodes",
           f"{rate:.0f} relays/s", f"the Requester alone, same fleet, same run "
           f"({anchor_rate:.0f}/s)", f"{ratio:.2f}x", ">= 300 relays/s and >= 0.25x",
           ok and rate >= 300 and ratio >= 0.25)
    report("sim_nodes.py", "CPU-ms per relay, loop actors + stores",
           f"{actors_ms:.2f} + {stores_ms:.2f} = {actors_ms + stores_ms:.2f} ms "
           f"(idle: actors {idle_actors:.3f}, stores {idle_stores:.3f} cores)",
           f"the Requester alone's client ({anchor_ms:.2f} ms)",
           f"{(actors_ms + stores_ms) / max(anchor_ms, 1e-9):.1f}x", "<= 3 ms",
           ok and actors_ms + stores_ms <= 3.0)


if __name__ == "__main__":
    main()
