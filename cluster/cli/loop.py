"""``testbench run``: the measuring loop, driven until one round, full buffers or a time-out."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from actors import loop
from cluster.cli.output import progress
from cluster.core.settings import Settings
from cluster.leaderboard.scores import fetch_scores, fetch_unmeasurable
from cluster.local.bootstrap import init_ray
from cluster.reports.scores import UNMEASURABLE_TITLE, format_scores, format_unmeasurable


def add_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="run the measuring loop")
    r.set_defaults(handler=run, needs_stores=True)
    g = r.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="one planning round, then wait for it")
    g.add_argument("--until-full", action="store_true", help="until every buffer is full or its pair cannot be measured "
                        "(then exit 1 naming it)")
    r.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")


def run_loop(settings: Settings, until_full: bool, once: bool, timeout_s: float | None) -> bool:
    """Start Ray (or join the configured cluster) and drive the detached Manager."""
    init_ray(settings)
    return loop.run_loop(settings, until_full, once, timeout_s, progress=progress)


def run(settings: Settings, args: argparse.Namespace) -> int:
    ok = run_loop(settings, args.until_full, args.once, args.timeout)
    print(format_scores(asyncio.run(fetch_scores(settings))))
    unmeasurable = asyncio.run(fetch_unmeasurable(settings))
    if unmeasurable:
        print(f"\n{UNMEASURABLE_TITLE}")
        print(format_unmeasurable(unmeasurable, time.time()))
    return 0 if ok else 1
