"""Honesty as text tables: verdicts per node, the loop's identity findings, and
verification traffic against measuring traffic (``testbench scores``/``verify``, ``make run``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cluster.honesty.traffic import TrafficReport
from cluster.honesty.verdicts import Verdict, summarize
from cluster.tasks.identity import IdentityFinding


def format_verdicts(verdicts: Sequence[Verdict], *, width: int = 100) -> str:
    """A plain-text table: one row per node, its status, and why (for the CLI and
    ``make run``). ``unverified`` = nothing failed but some check could not be made."""
    rows = []
    for summary in summarize(verdicts):
        marks = " ".join(f"{v.check}={v.outcome.value}" for v in summary.verdicts)
        why = "; ".join(f"{v.check}: {v.reason}" for v in summary.flagged) or "-"
        rows.append((summary.node_id, summary.status, marks, why))
    if not rows:
        return "(no verdicts)"
    name_w = max(4, *(len(r[0]) for r in rows))
    status_w = max(8, *(len(r[1]) for r in rows))
    lines = [f"{'node':<{name_w}}  {'status':<{status_w}}  reason",
             "-" * min(width, name_w + 40)]
    for node, status, marks, why in rows:
        lines.append(f"{node:<{name_w}}  {status:<{status_w}}  {why}"[:width * 3])
        lines.append(f"{'':<{name_w}}  {'':<{status_w}}  {marks}")
    return "\n".join(lines)


def format_signature_findings(findings: Mapping[str, IdentityFinding]) -> str:
    lines = [f"{'node':<22} {'outcome':<8} reason"]
    for node_id in sorted(findings):
        f = findings[node_id]
        lines.append(f"{node_id:<22} {f.outcome.value:<8} {f.reason}")
    return "\n".join(lines)


def format_traffic(reports: Sequence[TrafficReport]) -> str:
    """Nodes that had verification traffic; empty when none had."""
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
