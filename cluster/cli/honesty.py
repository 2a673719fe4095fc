"""``testbench verify``: one honesty round over the registered LLM nodes, on demand."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from typing import Any

from cluster.cli.output import error
from cluster.core.settings import Settings
from cluster.honesty.verdicts import Verdict
from cluster.honesty.verification import verify_registered_nodes
from cluster.nodes.policy import EndpointGuard
from cluster.reports.honesty import format_verdicts
from cluster.storage.connections import open_mongo


def add_parser(sub: Any) -> None:
    v = sub.add_parser("verify", help="honesty round: signatures, synthetic jobs, substitution")
    v.set_defaults(handler=run, needs_stores=True)
    v.add_argument("--seed", type=int, default=None, help="probe seed (default: fresh)")
    v.add_argument("--json", action="store_true")


async def _verify(settings: Settings, seed: int | None) -> list[Verdict]:
    async with open_mongo(settings) as mongo:
        # the nodes obey the endpoint policy with the Requester's allowlist
        guard = EndpointGuard.of(settings.requester.endpoint_allowlist)
        return await verify_registered_nodes(settings.honesty, mongo, seed=seed, guard=guard)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.honesty.references:
        error("no trusted references configured: set honesty.references in the settings "
              "(claimed model -> {url: <Serve LLM app>, model_dir: <tokenizer/model dir>})")
        return 2
    verdicts = asyncio.run(_verify(settings, args.seed))
    if args.json:
        print(json.dumps([dataclasses.asdict(v) for v in verdicts], indent=2, default=str))
    else:
        print(format_verdicts(verdicts))
    return 0
