"""The outcome of one honesty check on one node, how it is stored, and how it is shown.

A :class:`Verdict` is ``pass``, ``fail`` or ``unknown`` (the check could not be made: the
node has no signature route, did not answer, or the reference failed). MongoDB's
:class:`~cluster.storage.mongo.VerdictRecord` knows only pass/fail, meaning *flagged or
not*: an unknown is stored as ``pass`` (not flagged) with ``evidence.outcome = "unknown"``
and its reason, so nothing about it is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.core.verdicts import Outcome
from cluster.storage.mongo import VerdictRecord

CHECK_TOKENIZER = "tokenizer_signature"
CHECK_CONFIG = "config_signature"
CHECK_IDENTITY = "identity"
CHECK_SYNTHETIC = "synthetic"
CHECK_SUBSTITUTION = "substitution"
CHECKS: tuple[str, ...] = (CHECK_TOKENIZER, CHECK_CONFIG, CHECK_IDENTITY, CHECK_SYNTHETIC,
                           CHECK_SUBSTITUTION)
TRAFFIC_KEY = "traffic"


@dataclass(frozen=True)
class Traffic:
    """Requests and tokens a check sent to a node. ``requests`` may be fractional: prompts
    of several checks share one batched request, which is split between them."""

    requests: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.requests + other.requests, self.prompt_tokens + other.prompt_tokens,
                       self.completion_tokens + other.completion_tokens)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, float | int]:
        return {"requests": round(self.requests, 6), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Traffic:
        if not isinstance(raw, Mapping):
            return cls()
        return cls(float(raw.get("requests", 0.0)), int(raw.get("prompt_tokens", 0)),
                   int(raw.get("completion_tokens", 0)))


@dataclass(frozen=True)
class Verdict:
    """One check's outcome on one node in one round, with the evidence behind it."""

    node_id: str
    check: str
    outcome: Outcome
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def flagged(self) -> bool:
        return self.outcome is Outcome.FAIL

    def to_record(self, round_id: str, ts: float) -> VerdictRecord:
        """The MongoDB record; ``verdict_id`` is stable per (check, node, round), so a
        replayed round rewrites the same documents."""
        evidence = {**_storable(self.evidence), "outcome": self.outcome.value,
                    "round": round_id, TRAFFIC_KEY: self.traffic.as_dict()}
        return VerdictRecord(
            verdict_id=f"{self.check}|{self.node_id}|{round_id}", node_id=self.node_id,
            check=self.check, verdict="fail" if self.flagged else "pass", reason=self.reason,
            evidence=evidence, ts=ts)


def _storable(value: Any) -> Any:
    """Evidence as strings, numbers, lists and dicts (MongoDB stand-ins turn bools to 0/1)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


@dataclass(frozen=True)
class NodeSummary:
    """All of a node's verdicts in a round: trusted when none failed and none is unknown."""

    node_id: str
    verdicts: tuple[Verdict, ...]

    @property
    def flagged(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.flagged)

    @property
    def status(self) -> str:
        if self.flagged:
            return "FLAGGED"
        if any(v.outcome is Outcome.UNKNOWN for v in self.verdicts):
            return "trusted*"
        return "trusted"


def summarize(verdicts: Iterable[Verdict]) -> list[NodeSummary]:
    by_node: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        by_node.setdefault(verdict.node_id, []).append(verdict)
    return [NodeSummary(node, tuple(vs)) for node, vs in by_node.items()]


def format_verdicts(verdicts: Sequence[Verdict], *, width: int = 100) -> str:
    """A plain-text table: one row per node, its status, and why (for the CLI and
    ``make run``). ``trusted*`` = nothing failed but some check could not be made."""
    rows = []
    for summary in summarize(verdicts):
        marks = " ".join(f"{v.check}={v.outcome.value}" for v in summary.verdicts)
        why = "; ".join(f"{v.check}: {v.reason}" for v in summary.flagged) or "-"
        rows.append((summary.node_id, summary.status, marks, why))
    if not rows:
        return "(no verdicts)"
    name_w = max(4, *(len(r[0]) for r in rows))
    lines = [f"{'node':<{name_w}}  {'status':<8}  reason", "-" * min(width, name_w + 40)]
    for node, status, marks, why in rows:
        lines.append(f"{node:<{name_w}}  {status:<8}  {why}"[:width * 3])
        lines.append(f"{'':<{name_w}}  {'':<8}  {marks}")
    return "\n".join(lines)
