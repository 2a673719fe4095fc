"""Validator side: recompute a random sample of a node's claimed nonces and judge it.

A sampled nonce mismatches when the recomputed distance differs from the claimed one by
more than ``distance_tolerance``, or when either is not below ``r_target``. Honest nodes
mismatch only through hardware differences near the boundary (``honest_mismatch_rate``);
the node is a fraud when P(X >= mismatches | honest) is below ``p_value_threshold``.

Sequential: ``sample_size`` nonces first; a node not convicted by them but with
``escalate_at`` mismatches or more (suspicious: an honest node shows one in ~10% of rounds)
gets ``second_sample_size`` more, drawn from the nonces not yet checked, and the test is
applied to all nonces checked. Both stages use the same threshold, so a conviction at
either is as strong as a fixed sample's; the false-conviction and detection probabilities
of the whole procedure are exact sums (``cluster/poc/binomial.py``,
``sequential_conviction_probability``).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.core.verdicts import Check, Outcome, VerdictRecord
from cluster.poc.binomial import binomial_tail
from cluster.poc.config import ValidationConfig

if TYPE_CHECKING:  # judging needs no torch: the node's ingress imports this module
    from cluster.poc.compute import PocComputer

MismatchReason = Literal["distance_differs", "not_below_r_target", "claimed_not_below_r_target"]


class PocRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClaimedProof(PocRecord):
    """What a node claims for a round: its key and nonces with their distances."""

    node_id: str = Field(min_length=1, max_length=256)
    public_key: str = Field(min_length=1, max_length=512)
    nonces: list[int]
    distances: list[float]

    @model_validator(mode="after")
    def _same_length(self) -> ClaimedProof:
        if len(self.nonces) != len(self.distances):
            raise ValueError(
                f"{len(self.nonces)} nonces but {len(self.distances)} distances: one per nonce"
            )
        return self


class Mismatch(PocRecord):
    nonce: int
    claimed_distance: float
    recomputed_distance: float
    reason: MismatchReason


class Judgement(PocRecord):
    n_checked: int
    mismatches: list[Mismatch]
    p_value: float
    fraud: bool
    stages: int = 1
    n_first_stage: int = 0
    first_stage_mismatches: int = 0


class VerdictEvidence(PocRecord):
    mismatches: list[Mismatch] = Field(description="the first max_evidence mismatches")
    sampled_nonces_sha256: str
    duplicate_nonces: int
    distance_tolerance: float
    weights_sha256: str
    validation_s: float


class Verdict(PocRecord):
    verdict_id: str
    node_id: str
    public_key: str
    seed: str
    r_target: float
    model_fingerprint: str
    n_claimed: int
    n_unique: int
    n_sampled: int
    n_mismatch: int
    mismatch_rate: float
    honest_mismatch_rate: float
    p_value: float
    p_value_threshold: float
    fraud: bool
    sample_seed: int
    validated_at: float
    evidence: VerdictEvidence
    stages: int = Field(default=1, description="2 when the first sample drew a second")
    n_first_stage: int = 0
    first_stage_mismatches: int = 0

    @property
    def outcome(self) -> Outcome:
        """Fail for a fraud; unknown when no nonce was sampled (nothing was checked)."""
        if self.fraud:
            return Outcome.FAIL
        return Outcome.PASS if self.n_sampled else Outcome.UNKNOWN

    def to_record(self) -> VerdictRecord:
        """The stored verdict (check ``poc``); every figure of the validation is evidence."""
        test = (f"{self.n_mismatch} of {self.n_sampled} sampled nonces mismatch, "
                f"p = {self.p_value:.3g}")
        if self.stages == 2:
            test += (f" (second sample after {self.first_stage_mismatches} mismatches in the "
                     f"first {self.n_first_stage})")
        reason = {
            Outcome.FAIL: f"fraud: {test} < {self.p_value_threshold:g}",
            Outcome.PASS: f"{test} >= {self.p_value_threshold:g}",
            Outcome.UNKNOWN: f"unknown: no nonce to check ({self.n_claimed} claimed)",
        }[self.outcome]
        evidence = self.model_dump(mode="json", exclude={
            "verdict_id", "node_id", "fraud", "validated_at", "evidence"})
        evidence.update(self.evidence.model_dump(mode="json"))
        return VerdictRecord(verdict_id=self.verdict_id, node_id=self.node_id, check=Check.POC,
                             outcome=self.outcome, reason=reason, evidence=evidence,
                             ts=self.validated_at)


def find_mismatches(
    nonces: Sequence[int],
    claimed: Sequence[float],
    recomputed: Sequence[float],
    r_target: float,
    tolerance: float,
) -> list[Mismatch]:
    out: list[Mismatch] = []
    for nonce, c, r in zip(nonces, claimed, recomputed, strict=True):
        reason: MismatchReason | None = None
        if not c < r_target:
            reason = "claimed_not_below_r_target"
        elif not abs(c - r) <= tolerance:  # also catches NaN
            reason = "distance_differs"
        elif not r < r_target:
            reason = "not_below_r_target"
        if reason is not None:
            out.append(Mismatch(nonce=nonce, claimed_distance=c, recomputed_distance=r, reason=reason))
    return out


def judge(
    nonces: Sequence[int],
    claimed: Sequence[float],
    recomputed: Sequence[float],
    r_target: float,
    config: ValidationConfig,
) -> Judgement:
    """Mismatches among recomputed nonces and the binomial test's decision."""
    mismatches = find_mismatches(nonces, claimed, recomputed, r_target, config.distance_tolerance)
    p_value = binomial_tail(len(mismatches), len(nonces), config.honest_mismatch_rate)
    return Judgement(
        n_checked=len(nonces), mismatches=mismatches, p_value=p_value,
        fraud=p_value < config.p_value_threshold,
    )


class PocValidator:
    """Judges claims for one round with the round's model (built once, shared over keys)."""

    def __init__(
        self,
        computer: PocComputer,
        config: ValidationConfig,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._computer = computer
        self._config = config
        self._clock = clock
        self._timer = timer
        self._weights = computer.weights_digest()

    @property
    def config(self) -> ValidationConfig:
        return self._config

    @staticmethod
    def _unique(claim: ClaimedProof) -> list[int]:
        first: dict[int, int] = {}
        for i, nonce in enumerate(claim.nonces):
            first.setdefault(nonce, i)
        return sorted(first.values())

    def sample(self, claim: ClaimedProof, rng: random.Random) -> list[int]:
        """Indices into the claim (first occurrence of each nonce), sampled without replacement."""
        unique = self._unique(claim)
        return sorted(rng.sample(unique, min(self._config.sample_size, len(unique))))

    def second_sample(self, claim: ClaimedProof, first: list[int], rng: random.Random
                      ) -> list[int]:
        """``second_sample_size`` more indices, none of them in ``first``."""
        taken = set(first)
        rest = [i for i in self._unique(claim) if i not in taken]
        return sorted(rng.sample(rest, min(self._config.second_sample_size, len(rest))))

    def _check(self, claim: ClaimedProof, idx: list[int]) -> tuple[list[int], list[Mismatch]]:
        nonces = [claim.nonces[i] for i in idx]
        claimed = [claim.distances[i] for i in idx]
        recomputed = self._computer.with_key(claim.public_key).compute_distances(nonces).tolist()
        return nonces, find_mismatches(nonces, claimed, recomputed, self._computer.r_target,
                                       self._config.distance_tolerance)

    def judge_sequential(self, claim: ClaimedProof, rng: random.Random
                         ) -> tuple[list[int], Judgement]:
        """The nonces checked and the two-stage decision (module docstring)."""
        cfg = self._config
        first = self.sample(claim, rng)
        nonces, mismatches = self._check(claim, first)
        n1, m1 = len(nonces), len(mismatches)
        p_value = binomial_tail(m1, n1, cfg.honest_mismatch_rate)
        stages = 1
        if (p_value >= cfg.p_value_threshold and cfg.second_sample_size > 0
                and m1 >= cfg.escalate_at):
            second = self.second_sample(claim, first, rng)
            if second:
                more, more_mismatches = self._check(claim, second)
                nonces, mismatches, stages = nonces + more, mismatches + more_mismatches, 2
                p_value = binomial_tail(len(mismatches), len(nonces), cfg.honest_mismatch_rate)
        return nonces, Judgement(n_checked=len(nonces), mismatches=mismatches, p_value=p_value,
                                 fraud=p_value < cfg.p_value_threshold, stages=stages,
                                 n_first_stage=n1, first_stage_mismatches=m1)

    def validate(self, claim: ClaimedProof, sample_seed: int) -> Verdict:
        started = self._timer()
        rng = random.Random(sample_seed)
        nonces, result = self.judge_sequential(claim, rng)
        params = self._computer.params
        n_unique = len(set(claim.nonces))
        digest = hashlib.sha256(",".join(map(str, nonces)).encode()).hexdigest()
        verdict_id = hashlib.sha256(
            f"{params.seed}|{claim.node_id}|{claim.public_key}|{sample_seed}|{digest}".encode()
        ).hexdigest()[:32]
        return Verdict(
            verdict_id=verdict_id,
            node_id=claim.node_id,
            public_key=claim.public_key,
            seed=params.seed,
            r_target=params.r_target,
            model_fingerprint=params.model.fingerprint(),
            n_claimed=len(claim.nonces),
            n_unique=n_unique,
            n_sampled=len(nonces),
            n_mismatch=len(result.mismatches),
            mismatch_rate=len(result.mismatches) / len(nonces) if nonces else 0.0,
            honest_mismatch_rate=self._config.honest_mismatch_rate,
            p_value=result.p_value,
            p_value_threshold=self._config.p_value_threshold,
            fraud=result.fraud,
            sample_seed=sample_seed,
            validated_at=self._clock(),
            stages=result.stages,
            n_first_stage=result.n_first_stage,
            first_stage_mismatches=result.first_stage_mismatches,
            evidence=VerdictEvidence(
                mismatches=result.mismatches[: self._config.max_evidence],
                sampled_nonces_sha256=digest,
                duplicate_nonces=len(claim.nonces) - n_unique,
                distance_tolerance=self._config.distance_tolerance,
                weights_sha256=self._weights,
                validation_s=self._timer() - started,
            ),
        )
