"""``testbench nodes add|list|remove``: the registry of nodes the loop measures."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from pydantic import ValidationError

from cluster.cli.output import error
from cluster.core.errors import RegistrationError
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.modeldir.tokenizers import registered_node
from cluster.nodes.policy import check_node_url
from cluster.reports.registry import format_nodes
from cluster.storage.connections import open_mongo


def add_parser(sub: Any) -> None:
    n = sub.add_parser("nodes", help="register, list and remove nodes")
    n.set_defaults(handler=run, needs_stores=True)
    nsub = n.add_subparsers(dest="nodes_cmd", required=True)
    na = nsub.add_parser("add", help="register a node")
    na.add_argument("node_id")
    na.add_argument("url", help="base URL of the OpenAI-compatible server")
    na.add_argument("--model", required=True, help="the model the node claims to serve")
    na.add_argument("--api", default="completions", choices=["completions", "chat-completions"])
    na.add_argument("--kind", default="llm", choices=["llm", "diffusion"])
    na.add_argument("--tokenizer", help="tokenizer directory (stored absolute; must hold the "
                    "tokenizer's files) or Hugging Face hub id (only while the hub is on, or "
                    "cached); needed by the completions API")
    na.add_argument("--tasks", help="comma-separated tasks, groups or tags (default: all "
                    "configured)")
    na.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction,
                    default=None, help="prompts through the chat template (default: on for "
                    "chat-completions, off for completions, as lm-eval)")
    na.add_argument("--system-instruction", default=None,
                    help="prepended to every prompt (lm-eval's --system_instruction)")
    na.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction,
                    default=True, help="with a chat template, few-shot examples as turns")
    na.add_argument("--seeded-sampling", action="store_true",
                    help="the node samples with testbench's replayable seeded sampler (the LLM "
                    "app's seeded_sampling): verification rounds replay its sampled answers")
    nl = nsub.add_parser("list", help="list nodes")
    nl.add_argument("--json", action="store_true")
    nr = nsub.add_parser("remove", help="remove a node")
    nr.add_argument("node_id")


async def _add(settings: Settings, node: Node) -> None:
    await check_node_url(node.node_id, node.base_url, settings.requester.endpoint_allowlist)
    async with open_mongo(settings) as mongo:
        await mongo.nodes.add(node)


async def _remove(settings: Settings, node_id: str) -> bool:
    async with open_mongo(settings) as mongo:
        return await mongo.nodes.remove(node_id)


async def _list(settings: Settings) -> list[Node]:
    async with open_mongo(settings) as mongo:
        return await mongo.nodes.list()


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.nodes_cmd == "add":
        try:
            node = Node(
                node_id=args.node_id, url=args.url, model=args.model, api=args.api,
                tokenizer=args.tokenizer, kind=args.kind,
                tasks=args.tasks.split(",") if args.tasks else None,
                apply_chat_template=args.apply_chat_template,
                system_instruction=args.system_instruction,
                fewshot_as_multiturn=args.fewshot_as_multiturn,
                seeded_sampling=args.seeded_sampling,
            )
            node = registered_node(node)
        except ValidationError as exc:
            error(f"invalid node registration: {exc.errors(include_url=False)}")
            return 2
        except RegistrationError as exc:
            error(f"invalid node registration: {exc}")
            return 2
        try:
            asyncio.run(_add(settings, node))
        except RegistrationError as exc:
            error(f"refused node registration: {exc}")
            return 2
        print(f"added node {node.node_id} -> {node.base_url} ({node.model}, {node.api}"
              + (f", tokenizer {node.tokenizer}" if node.tokenizer else "") + ")")
        return 0
    if args.nodes_cmd == "remove":
        if not asyncio.run(_remove(settings, args.node_id)):
            error(f"no node {args.node_id!r}")
            return 1
        print(f"removed node {args.node_id}")
        return 0
    nodes = asyncio.run(_list(settings))
    if args.json:
        print(json.dumps([n.model_dump(mode="json") for n in nodes], indent=2))
    else:
        print(format_nodes(nodes))
    return 0
