"""``testbench organic run|list`` (alias ``job``): a user's own request, run on a node.

"Organic job" is a user's request answered by a chosen node, or by any trusted node
claiming a model; see ``docs/architecture.md`` for how it differs from streaming jobs,
evaluations and Ray jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from typing import Any

from pydantic import ValidationError

from cluster.cli.output import error
from cluster.core.settings import Settings
from cluster.organic.jobs import OrganicJobs, OrganicRequest, OrganicResult
from cluster.reports.organic import format_job
from cluster.storage.connections import open_mongo


def add_parser(sub: Any) -> None:
    j = sub.add_parser("organic", aliases=["job"],
                       help="organic jobs: run your request on a node, list past jobs")
    j.set_defaults(handler=run, needs_stores=True)
    jsub = j.add_subparsers(dest="organic_cmd", required=True)
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


async def _list(settings: Settings, limit: int, user: str | None) -> list[dict[str, Any]]:
    async with open_mongo(settings) as mongo:
        return await OrganicJobs(settings, mongo).list(limit, user)


async def _run(settings: Settings, request: OrganicRequest) -> OrganicResult:
    async with open_mongo(settings) as mongo:
        return await OrganicJobs(settings, mongo).run(request)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.organic_cmd == "list":
        docs = asyncio.run(_list(settings, args.limit, args.user))
        if args.json:
            print(json.dumps(docs, indent=2, default=str))
        elif not docs:
            print("no organic jobs yet: `testbench organic run --model NAME PROMPT`")
        else:
            print("\n".join(format_job(d) for d in docs))
        return 0
    try:
        request = OrganicRequest(
            node_id=args.node, model=args.model, prompt=args.prompt, api=args.api,
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
            user=args.user)
    except ValidationError as exc:
        error(f"invalid job: {'; '.join(e['msg'] for e in exc.errors(include_url=False))}")
        return 2
    result = asyncio.run(_run(settings, request))
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    elif result.ok:
        print(f"# job {result.job_id} on {result.node_id} ({result.model}) "
              f"in {result.latency_s:.2f}s")
        print(result.answer)
    else:
        tried = ", ".join(f"{a.node_id}: {a.error_code.name}" for a in result.attempts)
        error(f"job {result.job_id} failed ({tried}): {result.error}")
    return 0 if result.ok else 1
