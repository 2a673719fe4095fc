"""PoC settings: the public model parameters of a round and the validator's thresholds.

Defaults for the validator come from MLNode v1: an honest node disagrees with
a validator on at most 5e-4 of its nonces (hardware differences near ``r_target``), and a
node is judged a fraud when the binomial p-value of its mismatches over a 200-nonce
sample falls below 1e-7. On top of it, a sequential second stage: when the first 200 show
``escalate_at`` (1) mismatch or more without convicting, ``second_sample_size`` (800) more
are drawn and the test is applied to all of them. A node faking 2% of its nonces is then
convicted in 98.2% of rounds (37.1% with the first stage alone), an honest one in
1.2e-7 (computed: ``cluster/poc/binomial.py::sequential_conviction_probability``), at
276 nonces recomputed per honest node on average (``bench/poc_power.py``).
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PocModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PocModelParams(PocModel):
    """Shape of the seeded transformer. Tiny defaults for CPU; the same code runs large on GPU."""

    dim: int = Field(default=64, ge=8, description="hidden size")
    n_layers: int = Field(default=2, ge=1)
    n_heads: int = Field(default=4, ge=1)
    ffn_mult: int = Field(default=4, ge=1, description="feed-forward width = ffn_mult * dim")
    vocab_size: int = Field(default=4096, ge=2)
    seq_len: int = Field(default=16, ge=1, description="tokens per nonce input")
    out_dim: int = Field(default=64, ge=2, description="size of the output vector")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> PocModelParams:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        return self

    def fingerprint(self) -> str:
        """A stable hash of the parameters (part of the weight seed)."""
        raw = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()


class PocRoundParams(PocModel):
    """What every participant of a round agrees on: seed, model shape, target radius."""

    seed: str = Field(min_length=1, max_length=512, description="public seed, e.g. a block hash")
    model: PocModelParams = Field(default_factory=PocModelParams)
    r_target: float = Field(gt=0.0, le=2.0, description="a nonce is valid when distance < r_target")
    batch_size: int = Field(
        default=64, ge=1, le=65536,
        description="fixed forward-pass batch; inputs are padded to it so results do not "
                    "depend on how nonces are grouped",
    )


class ValidationConfig(PocModel):
    """How a validator samples and judges a node's claimed nonces."""

    sample_size: int = Field(default=200, ge=1, description="nonces recomputed per node")
    second_sample_size: int = Field(
        default=800, ge=0,
        description="nonces drawn more when the first sample is suspicious (0: one stage)")
    escalate_at: int = Field(
        default=1, ge=1,
        description="mismatches in the first sample that draw the second (when not convicted)")
    honest_mismatch_rate: float = Field(default=5e-4, gt=0.0, lt=1.0)
    p_value_threshold: float = Field(default=1e-7, gt=0.0, lt=1.0, description="fraud below this")
    distance_tolerance: float = Field(
        default=1e-5, ge=0.0,
        description="|claimed - recomputed| above this is a mismatch (0 demands bit equality)",
    )
    max_evidence: int = Field(default=20, ge=0, description="mismatches kept in the verdict")
