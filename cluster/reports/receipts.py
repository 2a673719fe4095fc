"""Streaming jobs and their receipt audits as text tables (``testbench receipts``)."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.core.streaming import StreamingJob
from cluster.honesty.receipt_audit import AuditReport


def format_jobs(jobs: Sequence[StreamingJob]) -> str:
    if not jobs:
        return "no streaming jobs registered: `testbench receipts register JOB --node ID --url URL`"
    lines = [f"{'job':<24} {'node':<22} {'model':<16} {'key':<18} {'audited':>10}  url"]
    for j in jobs:
        audited = "never" if j.last_audited_at is None else f"{j.last_audited_at:.0f}"
        state = "" if j.enabled else "  (disabled)"
        lines.append(f"{j.job_id:<24} {j.node_id:<22} {j.model:<16} {j.node_key[:16]+'..':<18} "
                     f"{audited:>10}  {j.base_url}{state}")
    return "\n".join(lines)


def format_audits(audits: Sequence[tuple[StreamingJob, AuditReport]]) -> str:
    """One row per audited job: its verdict and what it rests on."""
    if not audits:
        return "(no jobs audited)"
    lines = [f"{'job':<24} {'node':<22} {'verdict':<8} {'answers':>7} {'receipts ok':>11} "
             f"{'refused':>7} {'re-run':>6} {'differ':>6}"]
    for job, r in audits:
        lines.append(f"{job.job_id:<24} {job.node_id:<22} {r.outcome.value:<8} "
                     f"{r.exchanges:>7} {r.receipts_valid:>11} {r.receipts_refused:>7} "
                     f"{r.rerun:>6} {r.mismatches:>6}")
    return "\n".join(lines)
