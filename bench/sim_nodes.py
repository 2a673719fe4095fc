"""A simulated fleet: 1,000 test nodes on loopback, measured by the real loop until every
buffer is full (issue #7). Reports relays/s while filling, the actors' CPU while filling and
once idle at steady state, and how long the fill took.

The nodes: one test-node app (``cluster.testing.testnode``'s routes and fake model) in a server
process of its own, answering each node under its own path, ``http://127.0.0.1:P/n<i>``,
so a thousand nodes cost one port and one process. The loop: the real detached Manager
with its Ray children on a fresh local Ray instance, fresh embedded stores, gsm8k.

Anchor: the relay rate that 1,000 nodes x 1 task need at seed 000's production settings
(buffers of 50 refreshed within a 5-day TTL: 50 x 1,000 / 432,000 s = 0.12 relays/s);
the goal is to fill every buffer and sustain at least that rate (ratio >= 1).

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
SEED000_BUFFER, SEED000_TTL_S = 50, 5 * 24 * 3600.0


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

    children = ray.get(manager.children.remote())
    return {"manager": [pid(manager)], "samplers": [pid(a) for a in children["samplers"]],
            "evaluators": [pid(a) for a in children["evaluators"]],
            "requester": [pid(children["requester"])]}


def relays_so_far(manager: Any) -> int:
    import ray

    children = ray.get(manager.children.remote())
    return int(ray.get(children["requester"].stats.remote())["relays"])


def measure(manager: Any, cpu: CpuMeter, until_full: bool, timeout_s: float,
            fixed_s: float | None = None) -> tuple[Window, bool]:
    """Watch until every buffer is full (or for ``fixed_s``); the window's figures."""
    import ray

    t0, r0, c0 = time.monotonic(), relays_so_far(manager), cpu.snapshot()
    full = False
    last = (t0, r0)
    peak = 0.0
    while True:
        time.sleep(1.0)
        now = time.monotonic()
        status = ray.get(manager.status.remote())
        full = status["full"]
        if now - last[0] >= 10:
            relays = relays_so_far(manager)
            peak = max(peak, (relays - last[1]) / (now - last[0]))
            last = (now, relays)
            valid = sum(min(p["valid"], p["target"]) for p in status["pairs"])
            target = sum(p["target"] for p in status["pairs"])
            print(f"  [{now - t0:6.1f}s] samples {valid}/{target}, relays {relays - r0}",
                  flush=True)
        if (until_full and full) or (fixed_s is not None and now - t0 >= fixed_s):
            break
        if now - t0 > timeout_s:
            break
    c1 = cpu.snapshot()
    window = Window(time.monotonic() - t0, relays_so_far(manager) - r0,
                    {k: c1[k] - c0[k] for k in c0}, peak)
    return window, full


ACTORS = ("manager", "samplers", "evaluators", "requester")


async def register_fleet(settings: Any, base_url: str, n: int, tokenizer: str) -> None:
    from cluster.core.schemas import Node
    from cluster.storage.connections import StoreConnections

    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        nodes = [Node(node_id=f"n{i}", url=f"{base_url}/n{i}", model="smollm2",
                      tokenizer=tokenizer, tasks=[TASK]) for i in range(n)]
        # one bulk insert: a thousand single registrations would time the store, not the loop
        await mongo.nodes.add_many(nodes)
    finally:
        await conns.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--target", type=int, default=3, help="buffer size per (node, task)")
    ap.add_argument("--idle-s", type=float, default=15.0, help="steady-state window once full")
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()

    import ray

    from actors.remote import get_or_create_manager
    from cluster.core.settings import Settings, StoreSettings
    from cluster.local.embedded import EmbeddedStores, free_port
    from cluster.local.models import prepare_smollm2
    from cluster.tasks.datasets import load_datasets

    tokenizer = str(prepare_smollm2(ROOT / ".cache"))
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    port = free_port()
    server = ctx.Process(target=serve_nodes, args=(port, tokenizer, ready), daemon=True)
    server.start()
    ready.get(timeout=120)
    data_dir = Path(tempfile.mkdtemp(prefix="sim-nodes-"))
    embedded = EmbeddedStores(StoreSettings(data_dir=data_dir))
    with embedded as stores:
        base = Settings(stores=stores)
        settings = base.model_copy(update={
            "tasks": [TASK],
            "manager": base.manager.model_copy(update={
                "target_samples": args.target, "max_in_flight": args.target, "tick_s": 1.0,
                "node_refresh_s": 30.0}),
            "requester": base.requester.model_copy(update={
                "global_concurrency": 128, "per_node_concurrency": 4}),
        })
        asyncio.run(load_datasets(settings, [TASK]))
        asyncio.run(register_fleet(settings, f"http://127.0.0.1:{port}", args.nodes, tokenizer))
        # address="local": a fresh instance, never a cluster someone else started here
        ray.init(address="local", num_cpus=4, namespace=settings.ray.namespace,
                 include_dashboard=False, log_to_driver=False)
        try:
            t_start = time.monotonic()
            manager = get_or_create_manager(settings)
            ray.get(manager.ensure_started.remote())
            groups = actor_pids(manager)
            groups["mongodb"] = [p for p in [embedded.mongo and embedded.mongo.pid] if p]
            groups["postgresql"] = [p for p in [embedded.postgres and embedded.postgres.pid] if p]
            groups["nodes"] = [server.pid] if server.pid else []
            cpu = CpuMeter(groups)
            startup_s = time.monotonic() - t_start
            print(f"loop up in {startup_s:.1f} s; filling {args.nodes} buffers of {args.target}",
                  flush=True)
            fill, full = measure(manager, cpu, until_full=True, timeout_s=args.timeout)
            idle, _ = measure(manager, cpu, until_full=False, timeout_s=args.idle_s + 60,
                              fixed_s=args.idle_s)
        finally:
            ray.shutdown()
            server.terminate()
    shutil.rmtree(data_dir, ignore_errors=True)

    rate = fill.relays / fill.wall_s
    need = args.nodes * SEED000_BUFFER / SEED000_TTL_S
    per_kind = ", ".join(f"{k} {fill.group_cores(k):.2f}" for k in ACTORS)
    others = ", ".join(f"{k} {fill.group_cores(k):.2f}" for k in fill.cpu_s if k not in ACTORS)
    print(f"\nsim_nodes: {args.nodes} nodes x {TASK}, buffers of {args.target}: "
          f"{'all full' if full else 'NOT full'} in {fill.wall_s:.1f} s "
          f"(+{startup_s:.1f} s start-up)")
    print(f"  filling: {fill.relays} relays, {rate:.1f} relays/s (best 10 s: "
          f"{fill.peak_relays_s:.1f}/s); actors' CPU "
          f"{fill.cores:.2f} cores ({per_kind}); "
          f"{1000 * fill.cores * fill.wall_s / max(fill.relays, 1):.1f} CPU-ms per relay")
    print(f"  outside the actors, cores: {others}")
    print(f"  steady state (full, {idle.wall_s:.0f} s): {idle.relays} relays, actors' CPU "
          f"{idle.cores:.3f} cores")
    from bench_results import report

    report("sim_nodes.py", f"relays/s filling {args.nodes:,} simulated nodes' buffers",
           f"{rate:.1f} relays/s, actors {fill.cores:.2f} cores (idle {idle.cores:.3f})",
           f"{args.nodes:,} nodes' need at seed 000 settings ({need:.2f}/s)",
           f"{rate / need:.0f}x", "every buffer full, >= 1x", full and rate >= need)


if __name__ == "__main__":
    main()
