"""The local environment: ``testbench up`` (embedded stores), ``models prepare`` and
``demo`` (what ``make run`` runs)."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from cluster.cli.output import error
from cluster.core.settings import Settings
from cluster.local.bootstrap import stores_running
from cluster.local.demo import run_demo
from cluster.local.models import prepare_smollm2
from cluster.reports.registry import format_loads
from cluster.tasks.datasets import load_datasets


def add_parser(sub: Any) -> None:
    u = sub.add_parser("up", help="start the embedded stores and load the shipped datasets")
    u.set_defaults(handler=up, needs_stores=False)

    m = sub.add_parser("models", help="prepare bundled models")
    m.set_defaults(handler=models, needs_stores=False)
    msub = m.add_subparsers(dest="models_cmd", required=True)
    mp = msub.add_parser("prepare", help="convert a bundled model once")
    mp.add_argument("name")

    dm = sub.add_parser("demo", help="what `make run` does: measure local nodes end to end")
    dm.set_defaults(handler=demo, needs_stores=False)
    dm.add_argument("--target", type=int, default=None,
                    help="samples per (node, task) (default: sized per task to take minutes)")
    dm.add_argument("--timeout", type=float, default=1800.0)
    dm.add_argument("--serve", action="store_true",
                    help="then keep the nodes and the leaderboard page up until Ctrl-C")


def up(settings: Settings, args: argparse.Namespace) -> int:
    with stores_running(settings, publish=True) as s:
        print(format_loads(asyncio.run(load_datasets(s))))
        print(f"postgres: {s.stores.postgres_url}\nmongo:    {s.stores.mongo_url}")
        print("stores are up; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def models(settings: Settings, args: argparse.Namespace) -> int:
    if args.name != "smollm2":
        error(f"unknown model {args.name!r}: the bundled test model is 'smollm2'")
        return 2
    path = prepare_smollm2(Path(settings.cache_dir))
    print(f"smollm2 ready at {path}")
    return 0


def demo(settings: Settings, args: argparse.Namespace) -> int:
    return run_demo(settings, target=args.target, timeout_s=args.timeout,
                    serve_page=args.serve)
