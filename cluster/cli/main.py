"""The ``testbench`` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster.core.errors import TestbenchError
from cluster.core.settings import Settings, load_settings
from cluster.leaderboard.scores import fetch_scores
from cluster.reports.scores import format_scores
from cluster.tasks.datasets import load_datasets

log = logging.getLogger("testbench")


# ---- helpers ----------------------------------------------------------------------------
def _err(msg: str) -> None:
    print(f"testbench: error: {msg}", file=sys.stderr)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _with_mongo(settings: Settings, fn: Any) -> Any:
    from cluster.storage.connections import StoreConnections

    conns = StoreConnections(settings)
    try:
        mongo = await conns.mongo()
        await mongo.ensure_indexes()
        return await fn(mongo)
    finally:
        await conns.close()


async def _with_datasets(settings: Settings, fn: Any) -> Any:
    from cluster.storage.connections import StoreConnections

    conns = StoreConnections(settings)
    try:
        store = await conns.datasets()
        await store.ensure_schema()
        return await fn(store)
    finally:
        await conns.close()


# ---- datasets -----------------------------------------------------------------------------
def cmd_datasets(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.tasks import datasets as datasets_loader
    if args.datasets_cmd == "list":
        async def listing(store: Any) -> list[Any]:
            return await store.list_registry()

        rows = asyncio.run(_with_datasets(settings, listing))
        if not rows:
            print("no datasets loaded: run `testbench datasets load`")
        for r in rows:
            d = r if isinstance(r, dict) else r.model_dump()
            print(f"{d['task_name']:<20} {d['n_docs']:>7} docs  splits={d['splits']}  "
                  f"sha256={str(d['sha256'])[:12]}")
        return 0
    if args.file:
        if not args.name:
            _err("--file needs --name (the task/dataset name to load it under)")
            return 2

        async def user(store: Any) -> Any:
            return await datasets_loader.load_user_file(store, args.name, Path(args.file), args.split)

        results = [asyncio.run(_with_datasets(settings, user))]
    elif args.hub:
        async def hub(store: Any) -> Any:
            return await datasets_loader.load_hub_dataset(
                store, args.name or args.hub.replace("/", "_"), args.hub, args.hub_name, args.split)

        results = [asyncio.run(_with_datasets(settings, hub))]
    else:
        results = asyncio.run(load_datasets(settings, args.task or None))
    for r in results:
        d = r if isinstance(r, dict) else r.model_dump() if hasattr(r, "model_dump") else vars(r)
        state = "loaded" if d.get("loaded") else "unchanged"
        print(f"{d['task']:<20} {state:<9} {d['n_docs']:>7} docs  sha256={str(d['sha256'])[:12]}")
    return 0


# ---- nodes --------------------------------------------------------------------------------
def cmd_nodes(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.core.schemas import Node

    if args.nodes_cmd == "add":
        try:
            node = Node(
                node_id=args.node_id, url=args.url, model=args.model, api=args.api,
                tokenizer=args.tokenizer, kind=args.kind,
                tasks=args.tasks.split(",") if args.tasks else None,
            )
        except ValidationError as exc:
            _err(f"invalid node registration: {exc.errors(include_url=False)}")
            return 2
        asyncio.run(_with_mongo(settings, lambda m: m.nodes.add(node)))
        print(f"added node {node.node_id} -> {node.base_url} ({node.model}, {node.api})")
        return 0
    if args.nodes_cmd == "remove":
        removed = asyncio.run(_with_mongo(settings, lambda m: m.nodes.remove(args.node_id)))
        if not removed:
            _err(f"no node {args.node_id!r}")
            return 1
        print(f"removed node {args.node_id}")
        return 0
    nodes = asyncio.run(_with_mongo(settings, lambda m: m.nodes.list()))
    if args.json:
        print(json.dumps([n.model_dump(mode="json") for n in nodes], indent=2))
        return 0
    if not nodes:
        print("no nodes registered: `testbench nodes add ID URL --model NAME`")
    for n in nodes:
        print(f"{n.node_id:<20} {n.base_url:<32} {n.model:<24} {n.api:<17} "
              f"{'enabled' if n.enabled else 'disabled'}")
    return 0


# ---- scores -------------------------------------------------------------------------------
async def read_honesty(settings: Settings, mongo: Any) -> dict[str, Any]:
    """Each node's latest verdicts, the loop's identity findings and its verification vs
    measuring traffic (buffer TTL window), from one registry read."""
    from cluster.honesty.traffic import traffic_report
    from cluster.honesty.verification import latest_verdicts
    from cluster.tasks.signature import read_signature_findings

    nodes = await mongo.nodes.list()
    node_ids = [n.node_id for n in nodes]
    since = time.time() - settings.manager.sample_ttl_s
    return {
        "verdicts": await latest_verdicts(mongo, node_ids),
        "signatures": await read_signature_findings(settings, mongo, nodes),
        "traffic": await traffic_report(mongo, node_ids, since),
    }


async def fetch_signature_findings(settings: Settings) -> dict[str, Any]:
    """Seed 000's grouping rule over the loop's signature samples (buffer TTL window)."""
    from cluster.tasks.signature import read_signature_findings

    return await _with_mongo(settings, lambda m: read_signature_findings(settings, m))


def format_signature_findings(findings: dict[str, Any]) -> str:
    lines = [f"{'node':<22} {'outcome':<8} reason"]
    for node_id in sorted(findings):
        f = findings[node_id]
        lines.append(f"{node_id:<22} {f.outcome.value:<8} {f.reason}")
    return "\n".join(lines)


def format_traffic(reports: list[Any]) -> str:
    lines = [f"{'node':<22} {'verify req':>10} {'measure req':>11} {'req share':>9} "
             f"{'token share':>11}"]
    for r in reports:
        if not r.verification.requests:
            continue
        req = "-" if r.request_share is None else f"{100 * r.request_share:.1f}%"
        tok = "-" if r.token_share is None else f"{100 * r.token_share:.1f}%"
        lines.append(f"{r.node_id:<22} {r.verification.requests:>10} "
                     f"{r.measuring.requests:>11} {req:>9} {tok:>11}")
    return "\n".join(lines) if len(lines) > 1 else ""


def cmd_scores(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.honesty.verdicts import format_verdicts

    async def read(mongo: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        return await mongo.buffers.summaries(), await read_honesty(settings, mongo)

    rows, honesty = asyncio.run(_with_mongo(settings, read))
    verdicts, traffic, signatures = honesty["verdicts"], honesty["traffic"], honesty["signatures"]
    if args.json:
        print(json.dumps({"scores": rows,
                          "verdicts": [dataclasses.asdict(v) for v in verdicts],
                          "signature_identity": {k: dataclasses.asdict(v)
                                                 for k, v in signatures.items()},
                          "verification_traffic": [t.as_dict() for t in traffic]},
                         indent=2, default=str))
        return 0
    if not rows:
        print("no scores yet: register nodes and `testbench run`")
    else:
        print(format_scores(rows))
    if signatures:
        print("\nidentity signatures from the loop (bit-identical answers + logprobs = one backend):")
        print(format_signature_findings(signatures))
    if verdicts:
        print("\nhonesty verdicts (latest per check):")
        print(format_verdicts(verdicts))
    table = format_traffic(traffic)
    if table:
        print("\nverification traffic vs measuring traffic (goal <= 10%):")
        print(table)
    return 0


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    """One honesty round over every registered LLM node, against the configured references."""
    import aiohttp

    from cluster.honesty.verdicts import format_verdicts
    from cluster.honesty.verification import build_references, verify_registered_nodes

    if not settings.honesty.references:
        _err("no trusted references configured: set honesty.references in the settings "
             "(claimed model -> {url: <Serve LLM app>, model_dir: <tokenizer/model dir>})")
        return 2

    async def go(mongo: Any) -> list[Any]:
        async with aiohttp.ClientSession() as http:
            refs = build_references(settings.honesty, http)
            return await verify_registered_nodes(settings.honesty, mongo, refs,
                                                 seed=args.seed, http=http)

    verdicts = asyncio.run(_with_mongo(settings, go))
    if args.json:
        print(json.dumps([dataclasses.asdict(v) for v in verdicts], indent=2, default=str))
    else:
        print(format_verdicts(verdicts))
    return 0


# ---- organic jobs -------------------------------------------------------------------------
def cmd_job(settings: Settings, args: argparse.Namespace) -> int:
    """Run a user's request on a chosen node (or any trusted node claiming a model); list jobs."""
    from cluster.organic.jobs import OrganicJobs, OrganicRequest, format_job

    if args.job_cmd == "list":
        docs = asyncio.run(_with_mongo(
            settings, lambda m: OrganicJobs(settings, m).list(args.limit, args.user)))
        if args.json:
            print(json.dumps(docs, indent=2, default=str))
        elif not docs:
            print("no organic jobs yet: `testbench job run --model NAME PROMPT`")
        else:
            print("\n".join(format_job(d) for d in docs))
        return 0
    try:
        request = OrganicRequest(
            node_id=args.node, model=args.model, prompt=args.prompt, api=args.api,
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
            user=args.user)
    except ValidationError as exc:
        _err(f"invalid job: {'; '.join(e['msg'] for e in exc.errors(include_url=False))}")
        return 2
    result = asyncio.run(_with_mongo(settings, lambda m: OrganicJobs(settings, m).run(request)))
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    elif result.ok:
        print(f"# job {result.job_id} on {result.node_id} ({result.model}) "
              f"in {result.latency_s:.2f}s")
        print(result.answer)
    else:
        tried = ", ".join(f"{a.node_id}: {a.error_code.name}" for a in result.attempts)
        _err(f"job {result.job_id} failed ({tried}): {result.error}")
    return 0 if result.ok else 1


# ---- run ----------------------------------------------------------------------------------
def run_loop(settings: Settings, until_full: bool, once: bool, timeout_s: float | None) -> bool:
    """Start Ray (or join the configured cluster) and drive the detached Manager."""
    from actors import loop
    from cluster.local.bootstrap import init_ray

    init_ray(settings)
    return loop.run_loop(settings, until_full, once, timeout_s, progress=_progress)


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    ok = run_loop(settings, args.until_full, args.once, args.timeout)
    print(format_scores(asyncio.run(fetch_scores(settings))))
    return 0 if ok else 1


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.local.bootstrap import stores_running

    with stores_running(settings, publish=True) as s:
        asyncio.run(load_datasets(s))
        print(f"postgres: {s.stores.postgres_url}\nmongo:    {s.stores.mongo_url}")
        print("stores are up; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.local.models import prepare_smollm2

    if args.name != "smollm2":
        _err(f"unknown model {args.name!r}: the bundled test model is 'smollm2'")
        return 2
    path = prepare_smollm2(Path(settings.cache_dir))
    print(f"smollm2 ready at {path}")
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.local.demo import run_demo

    return run_demo(settings, target=args.target, timeout_s=args.timeout)


def _cmd_poc(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.cli.poc import cmd_poc

    return cmd_poc(settings, args)


def _cmd_eval(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.cli.evaluations import cmd_eval

    return cmd_eval(settings, args)


# ---- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbench", description=__doc__)
    p.add_argument("--config", help="settings YAML (default: $TESTBENCH_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("up", help="start the embedded stores and load the shipped datasets")

    d = sub.add_parser("datasets", help="load or list task datasets in PostgreSQL")
    dsub = d.add_subparsers(dest="datasets_cmd", required=True)
    dl = dsub.add_parser("load", help="load shipped task datasets, a user file or a hub dataset")
    dl.add_argument("--task", action="append", help="only this shipped task (repeatable)")
    dl.add_argument("--file", help="a jsonl/json/csv/parquet file to load")
    dl.add_argument("--name", help="dataset name for --file / --hub")
    dl.add_argument("--split", default="test")
    dl.add_argument("--hub", help="a Hugging Face hub dataset path (needs network)")
    dl.add_argument("--hub-name", default=None, help="hub dataset config name")
    dsub.add_parser("list", help="list loaded datasets")

    n = sub.add_parser("nodes", help="register, list and remove nodes")
    nsub = n.add_subparsers(dest="nodes_cmd", required=True)
    na = nsub.add_parser("add", help="register a node")
    na.add_argument("node_id")
    na.add_argument("url", help="base URL of the OpenAI-compatible server")
    na.add_argument("--model", required=True, help="the model the node claims to serve")
    na.add_argument("--api", default="completions", choices=["completions", "chat-completions"])
    na.add_argument("--kind", default="llm", choices=["llm", "diffusion"])
    na.add_argument("--tokenizer", help="tokenizer path/id (needed for loglikelihood tasks)")
    na.add_argument("--tasks", help="comma-separated tasks (default: all configured)")
    nl = nsub.add_parser("list", help="list nodes")
    nl.add_argument("--json", action="store_true")
    nr = nsub.add_parser("remove", help="remove a node")
    nr.add_argument("node_id")

    r = sub.add_parser("run", help="run the measuring loop")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="one planning round, then wait for it")
    g.add_argument("--until-full", action="store_true", help="until every buffer is full")
    r.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")

    s = sub.add_parser("scores", help="node x task scores")
    s.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="honesty round: signatures, synthetic jobs, substitution")
    v.add_argument("--seed", type=int, default=None, help="probe seed (default: fresh)")
    v.add_argument("--json", action="store_true")

    j = sub.add_parser("job", help="organic jobs: run your request on a node, list past jobs")
    jsub = j.add_subparsers(dest="job_cmd", required=True)
    jr = jsub.add_parser("run", help="run a prompt on a chosen node or any node of a model")
    target = jr.add_mutually_exclusive_group(required=True)
    target.add_argument("--node", help="this node")
    target.add_argument("--model", help="any trusted node claiming this model (fastest first)")
    jr.add_argument("prompt")
    jr.add_argument("--api", choices=["chat-completions", "completions"], default=None,
                    help="default: the node's own API")
    jr.add_argument("--max-tokens", type=int, default=256)
    jr.add_argument("--temperature", type=float, default=0.0)
    jr.add_argument("--seed", type=int, default=None)
    jr.add_argument("--user", default="cli", help="who asked (recorded with the job)")
    jr.add_argument("--json", action="store_true")
    jl = jsub.add_parser("list", help="recorded jobs, newest first")
    jl.add_argument("--limit", type=int, default=20)
    jl.add_argument("--user", default=None)
    jl.add_argument("--json", action="store_true")

    m = sub.add_parser("models", help="prepare bundled models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    mp = msub.add_parser("prepare", help="download and convert a bundled model once")
    mp.add_argument("name")

    dm = sub.add_parser("demo", help="what `make run` does: measure local nodes end to end")
    dm.add_argument("--target", type=int, default=None,
                    help="samples per (node, task) (default: sized per task to take minutes)")
    dm.add_argument("--timeout", type=float, default=1800.0)

    from cluster.cli.evaluations import add_eval_parser
    from cluster.cli.poc import add_poc_parser

    add_poc_parser(sub)
    add_eval_parser(sub)
    return p


COMMANDS = {
    "up": cmd_up, "datasets": cmd_datasets, "nodes": cmd_nodes, "run": cmd_run,
    "scores": cmd_scores, "models": cmd_models, "demo": cmd_demo, "poc": _cmd_poc,
    "eval": _cmd_eval, "verify": cmd_verify, "job": cmd_job,
}
# Commands that need running stores (started here when nothing is running yet).
NEEDS_STORES = {"datasets", "nodes", "run", "scores", "poc", "verify", "job"}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        settings = load_settings(args.config)
    except (ValidationError, ValueError, OSError) as exc:
        _err(f"bad settings: {exc}")
        sys.exit(2)
    try:
        if args.cmd in NEEDS_STORES:
            from cluster.local.bootstrap import stores_running

            with stores_running(settings) as resolved:
                code = COMMANDS[args.cmd](resolved, args)
        else:
            code = COMMANDS[args.cmd](settings, args)
    except TestbenchError as exc:
        _err(str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)
