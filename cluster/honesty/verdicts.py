"""The outcome of one honesty check on one node, how it is stored, and how it is shown.

A :class:`Verdict` is ``pass``, ``fail`` or ``unknown`` (the check could not be made: the
node has no signature route, did not answer, or the reference failed). It is stored as the
one :class:`~cluster.core.verdicts.VerdictRecord` with its outcome as is: an unknown is
stored and read as ``unknown``, and a node with an unknown check is shown *unverified*,
never trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.core.verdicts import Check, Outcome, VerdictRecord

CHECK_TOKENIZER = Check.TOKENIZER_SIGNATURE
CHECK_CONFIG = Check.CONFIG_SIGNATURE
CHECK_IDENTITY = Check.IDENTITY
CHECK_SYNTHETIC = Check.SYNTHETIC
CHECK_SUBSTITUTION = Check.SUBSTITUTION
CHECK_SEEDED = Check.SEEDED_SAMPLING
# the checks a verification round makes on every node, in the order tables show them
CHECKS: tuple[str, ...] = (CHECK_TOKENIZER, CHECK_CONFIG, CHECK_IDENTITY, CHECK_SYNTHETIC,
                           CHECK_SUBSTITUTION)
# ... and every check a round can make: the seeded-sampling replay only on the nodes
# registered with ``seeded_sampling`` (a replay of any other sampler would fail them)
ROUND_CHECKS: tuple[str, ...] = (*CHECKS, CHECK_SEEDED)
TRAFFIC_KEY = "traffic"
# every verdict of a round says what became of the node's probes (cluster/honesty/evasion.py)
PROBES_KEY = "probes"


class VerdictSink(Protocol):
    """Where verdicts are written: ``VerdictStore``, or the loop's metered wrapper of it."""

    async def record(self, verdicts: Sequence[VerdictRecord]) -> int: ...


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
        """The stored record, outcome as is; ``verdict_id`` is stable per (check, node,
        round), so a replayed round rewrites the same documents."""
        evidence = {**_storable(self.evidence), "round": round_id,
                    TRAFFIC_KEY: self.traffic.as_dict()}
        return VerdictRecord(
            verdict_id=f"{self.check}|{self.node_id}|{round_id}", node_id=self.node_id,
            check=Check(self.check), outcome=self.outcome, reason=self.reason,
            evidence=evidence, ts=ts)

    @classmethod
    def from_record(cls, record: VerdictRecord) -> Verdict:
        """A stored verdict of a round, as the round made it (its traffic out of the
        evidence)."""
        evidence = dict(record.evidence)
        traffic = Traffic.from_dict(evidence.pop(TRAFFIC_KEY, None))
        return cls(record.node_id, record.check.value, record.outcome, record.reason, evidence,
                   traffic)


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
    """All of a node's verdicts in a round: flagged when one failed, else unverified when
    one is unknown (a check that could not be made is not a pass), else trusted."""

    node_id: str
    verdicts: tuple[Verdict, ...]

    @property
    def flagged(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.flagged)

    @property
    def status(self) -> str:
        if self.flagged:
            return "FLAGGED"
        if any(v.outcome is not Outcome.PASS for v in self.verdicts):
            return "unverified"
        return "trusted"


def summarize(verdicts: Iterable[Verdict]) -> list[NodeSummary]:
    by_node: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        by_node.setdefault(verdict.node_id, []).append(verdict)
    return [NodeSummary(node, tuple(vs)) for node, vs in by_node.items()]
