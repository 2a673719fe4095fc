"""``testbench datasets load|list``: task datasets in PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from cluster.cli.output import error
from cluster.core.settings import Settings
from cluster.reports.registry import format_loads, format_registry
from cluster.storage.connections import open_datasets
from cluster.tasks.datasets import LoadResult, load_datasets, load_hub_dataset, load_user_file


def add_parser(sub: Any) -> None:
    d = sub.add_parser("datasets", help="load or list task datasets in PostgreSQL")
    d.set_defaults(handler=run, needs_stores=True)
    dsub = d.add_subparsers(dest="datasets_cmd", required=True)
    dl = dsub.add_parser("load", help="load shipped task datasets, a user file or a hub dataset")
    dl.add_argument("--task", action="append",
                    help="only this task, group or tag (repeatable): shipped, or lm-eval's "
                    "built-in one read from tasks_sources (offline data dir, or the hub)")
    dl.add_argument("--file", help="a jsonl/json/csv/parquet file to load")
    dl.add_argument("--name", help="dataset name for --file / --hub")
    dl.add_argument("--split", default="test")
    dl.add_argument("--hub", help="a Hugging Face hub dataset path (needs network)")
    dl.add_argument("--hub-name", default=None, help="hub dataset config name")
    dsub.add_parser("list", help="list loaded datasets")


async def _list(settings: Settings) -> str:
    async with open_datasets(settings) as store:
        return format_registry(await store.list_registry())


async def _load_one(settings: Settings, args: argparse.Namespace) -> LoadResult:
    async with open_datasets(settings) as store:
        if args.file:
            return await load_user_file(store, args.name, Path(args.file), args.split)
        return await load_hub_dataset(store, args.name or args.hub.replace("/", "_"), args.hub,
                                      args.hub_name, args.split)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.datasets_cmd == "list":
        print(asyncio.run(_list(settings)))
        return 0
    if args.file and not args.name:
        error("--file needs --name (the task/dataset name to load it under)")
        return 2
    if args.file or args.hub:
        results = [asyncio.run(_load_one(settings, args))]
    else:
        results = asyncio.run(load_datasets(settings, args.task or None))
    print(format_loads(results))
    return 0
