"""The one verdict vocabulary and the one stored verdict: a check on a node passes, fails,
or could not be made.

``unknown`` is its own value everywhere, stored and read as such: a node whose check is
unknown is *unverified*, never trusted as if it had passed. Every check writes the same
:class:`VerdictRecord` to MongoDB's ``verdicts`` collection (through
``cluster.storage.mongo.VerdictStore``): the honesty round, the streaming-job audit and
the proof-of-compute validator alike, so every reader (the CLI, organic jobs, the
leaderboard) reads one shape.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    UNKNOWN = "unknown"


class Check(StrEnum):
    """What a verdict is about."""

    # a verification round (cluster/honesty/verification.py), one verdict per check and node
    TOKENIZER_SIGNATURE = "tokenizer_signature"
    CONFIG_SIGNATURE = "config_signature"
    IDENTITY = "identity"
    SYNTHETIC = "synthetic"
    SUBSTITUTION = "substitution"
    # nodes registered with seeded_sampling: the round's sampled answers replayed on the
    # reference (cluster/honesty/seeded_sampling.py); catches what differs only above T=0
    SEEDED_SAMPLING = "seeded_sampling"
    # the loop's judgement over a node's recent rounds (cluster/honesty/evasion.py): fails
    # when the node keeps leaving probes unanswered while it answers measuring traffic
    EVASION = "evasion"
    # the measuring traffic itself, compared with the trusted reference's per-doc results
    # and re-scored on it (cluster/honesty/measuring.py): fails when it deviates
    TRAFFIC_SUBSTITUTION = "traffic_substitution"
    # a streaming job's audit (cluster/honesty/receipt_audit.py): one failed verdict per
    # refused receipt, differing re-run or failed replay, and one summary per audit
    RECEIPT = "receipt"
    RERUN = "rerun"
    REPLAY = "replay"  # seeded sampled answers replayed on their committed token ids
    STREAMING_JOB = "streaming_job"
    # a proof-of-compute validation (cluster/poc/validator.py)
    POC = "poc"


# Per-request findings of an audit: only failures are written, so the audit's summary
# (STREAMING_JOB) says where a node stands, and these are its evidence.
DETAIL_CHECKS: frozenset[Check] = frozenset({Check.RECEIPT, Check.RERUN, Check.REPLAY})


class VerdictRecord(BaseModel):
    """One verdict about one node, as stored: which check, its outcome, why, the evidence.

    ``verdict_id`` is deterministic per check, node and round/job/validation, so a replayed
    check rewrites the same document. ``evidence`` is kept to strings, numbers and
    lists/dicts of them (MongoDB stand-ins turn bools into 0/1)."""

    model_config = ConfigDict(extra="forbid")

    verdict_id: str = Field(min_length=1)
    node_id: str = Field(min_length=1)
    check: Check
    outcome: Outcome
    reason: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    ts: float = Field(description="when the verdict was made (unix seconds)")

    @property
    def passed(self) -> bool:
        """Only a pass counts as verified: an unknown is not a pass."""
        return self.outcome is Outcome.PASS

    @property
    def flagged(self) -> bool:
        return self.outcome is Outcome.FAIL
