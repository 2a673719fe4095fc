"""``testbench receipts register|list|audit``: the streaming jobs whose receipts the loop
audits, and an audit on demand (the loop audits every enabled job every
``receipts.audit_every_s`` by itself; see ``cluster/honesty/job_audits.py``)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from cluster.core.settings import Settings
from cluster.core.streaming import StreamingJob
from cluster.honesty.job_audits import audit_registered_jobs, register_streaming_job
from cluster.honesty.receipt_audit import AuditReport
from cluster.reports.receipts import format_audits, format_jobs
from cluster.storage.connections import open_mongo


def add_parser(sub: Any) -> None:
    r = sub.add_parser("receipts", help="streaming jobs' signed receipts: register jobs, audit")
    r.set_defaults(handler=run, needs_stores=True)
    rsub = r.add_subparsers(dest="receipts_cmd", required=True)
    reg = rsub.add_parser("register", help="register a streaming job for the loop's audits")
    reg.add_argument("job_id")
    reg.add_argument("--node", required=True, help="the registered node serving it")
    reg.add_argument("--url", required=True, help="the job app's base URL")
    reg.add_argument("--model", default=None, help="default: the node's model")
    reg.add_argument("--key", default=None,
                     help="the key its receipts must carry (hex); default: the app's /job")
    ls = rsub.add_parser("list", help="registered streaming jobs")
    ls.add_argument("--json", action="store_true")
    au = rsub.add_parser("audit", help="audit jobs now: receipts, hashes, skew, replays, re-runs")
    au.add_argument("--job", action="append", default=None, help="this job (repeatable)")
    au.add_argument("--json", action="store_true")


async def _register(settings: Settings, args: argparse.Namespace) -> StreamingJob:
    async with open_mongo(settings) as mongo:
        return await register_streaming_job(settings, mongo, args.job_id, args.node, args.url,
                                            model=args.model, node_key=args.key)


async def _list(settings: Settings) -> list[StreamingJob]:
    async with open_mongo(settings) as mongo:
        return await mongo.streaming_jobs.list()


async def _audit(settings: Settings, job_ids: list[str] | None
                 ) -> list[tuple[StreamingJob, AuditReport]]:
    async with open_mongo(settings) as mongo:
        return await audit_registered_jobs(settings, mongo, job_ids)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.receipts_cmd == "register":
        job = asyncio.run(_register(settings, args))
        print(f"registered streaming job {job.job_id} of node {job.node_id} "
              f"(key {job.node_key[:16]}..)")
        return 0
    if args.receipts_cmd == "list":
        jobs = asyncio.run(_list(settings))
        print(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2) if args.json
              else format_jobs(jobs))
        return 0
    audits = asyncio.run(_audit(settings, args.job))
    if args.json:
        print(json.dumps([{"job": job.model_dump(mode="json"),
                           "report": report.model_dump(mode="json", exclude={"verdicts"})}
                          for job, report in audits], indent=2))
    else:
        print(format_audits(audits))
    return 1 if any(r.outcome.value == "fail" for _, r in audits) else 0
