"""``testbench scores``: every (node, task) buffer, its paired score against the trusted
reference, the pairs that cannot be measured (with their reasons), the honesty verdicts and
traffic shares."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from typing import Any

from cluster.core.buffers import UnmeasurablePair
from cluster.core.settings import Settings
from cluster.leaderboard.groups import fold_groups, group_summaries
from cluster.leaderboard.honesty import HonestyView, read_honesty
from cluster.leaderboard.paired import PairedRow, read_paired
from cluster.reports.honesty import format_signature_findings, format_traffic, format_verdicts
from cluster.reports.paired import PAIRED_TITLE, format_paired
from cluster.reports.scores import UNMEASURABLE_TITLE, format_scores, format_unmeasurable
from cluster.storage.connections import open_mongo
from cluster.tasks.registry import catalog_of, configured_groups


def add_parser(sub: Any) -> None:
    s = sub.add_parser("scores", help="node x task scores")
    s.set_defaults(handler=run, needs_stores=True)
    s.add_argument("--json", action="store_true")


async def _read(settings: Settings
                ) -> tuple[list[dict[str, Any]], list[UnmeasurablePair], HonestyView,
                           list[PairedRow]]:
    async with open_mongo(settings) as mongo:
        return (await mongo.buffers.summaries(), await mongo.buffers.unmeasurable(),
                await read_honesty(settings, mongo), await read_paired(mongo))


def run(settings: Settings, args: argparse.Namespace) -> int:
    rows, unmeasurable, honesty, paired = asyncio.run(_read(settings))
    # configured lm-eval groups: one row per node from their subtasks' buffers
    groups = configured_groups(settings.tasks, catalog_of(settings))
    if args.json:
        print(json.dumps({"scores": rows, "groups": group_summaries(rows, groups),
                          "unmeasurable": [p.model_dump() for p in unmeasurable],
                          "verdicts": [dataclasses.asdict(v) for v in honesty.verdicts],
                          "signature_identity": {k: dataclasses.asdict(v)
                                                 for k, v in honesty.signatures.items()},
                          "verification_traffic": [t.as_dict() for t in honesty.traffic],
                          "paired": [p.as_dict() for p in paired]},
                         indent=2, default=str))
        return 0
    print(format_scores(fold_groups(rows, groups)) if rows
          else "no scores yet: register nodes and `testbench run`")
    if paired:
        print(f"\n{PAIRED_TITLE}")
        print(format_paired(paired, rows))
    if unmeasurable:
        print(f"\n{UNMEASURABLE_TITLE}")
        print(format_unmeasurable(unmeasurable, time.time()))
    if honesty.signatures:
        print("\nidentity signatures from the loop (bit-identical answers + logprobs = one backend):")
        print(format_signature_findings(honesty.signatures))
    if honesty.verdicts:
        print("\nhonesty verdicts (latest per check):")
        print(format_verdicts(honesty.verdicts))
    table = format_traffic(honesty.traffic)
    if table:
        print("\nverification traffic vs measuring traffic (goal <= 10%):")
        print(table)
    return 0
