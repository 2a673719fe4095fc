"""Wire models of the node's PoC and control API: the only place a JSON field is spelled.

Modelled on MLNode: ``block_hash`` is the round's public seed, ``node_id`` /
``node_count`` split the nonce space between the nodes that share one key, ``url`` is the
callback base (batches go to ``{url}/generated`` and ``{url}/validated``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from cluster.poc.config import PocModelParams, PocRoundParams


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeState(StrEnum):
    """What the node runs: exactly one of POW, INFERENCE, TRAIN, or nothing (STOPPED)."""

    STOPPED = "STOPPED"
    POW = "POW"
    INFERENCE = "INFERENCE"
    TRAIN = "TRAIN"


class PowState(StrEnum):
    IDLE = "IDLE"
    LOADING = "LOADING"
    GENERATING = "GENERATING"
    VALIDATING = "VALIDATING"
    STOPPED = "STOPPED"


PowPhase = Literal["idle", "generate", "validate"]


class PowInitRequest(Wire):
    block_hash: str = Field(min_length=1, max_length=512, description="the round's public seed")
    block_height: int = Field(default=0, ge=0)
    public_key: str = Field(min_length=1, max_length=512, description="the node's public key")
    r_target: float = Field(gt=0.0, le=2.0)
    batch_size: int = Field(default=64, ge=1, le=65536)
    params: PocModelParams = Field(default_factory=PocModelParams)
    node_id: int = Field(default=0, ge=0, description="this node's index among node_count")
    node_count: int = Field(default=1, ge=1)
    url: HttpUrl | None = Field(default=None, description="callback base URL")
    fraud_threshold: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="p-value threshold for /pow/validate"
    )

    @model_validator(mode="after")
    def _index_in_range(self) -> PowInitRequest:
        if self.node_id >= self.node_count:
            raise ValueError(f"node_id ({self.node_id}) must be below node_count ({self.node_count})")
        return self

    def round_params(self) -> PocRoundParams:
        return PocRoundParams(
            seed=self.block_hash, model=self.params, r_target=self.r_target,
            batch_size=self.batch_size,
        )


class ProofBatch(Wire):
    public_key: str = Field(min_length=1, max_length=512)
    block_hash: str = Field(min_length=1, max_length=512)
    block_height: int = Field(default=0, ge=0)
    nonces: list[int]
    dist: list[float]
    node_id: int = 0

    @model_validator(mode="after")
    def _same_length(self) -> ProofBatch:
        if len(self.nonces) != len(self.dist):
            raise ValueError(f"{len(self.nonces)} nonces but {len(self.dist)} distances")
        return self


class ValidatedBatch(ProofBatch):
    received_dist: list[float] = Field(description="the distances this node recomputed")
    r_target: float
    fraud_threshold: float
    n_invalid: int
    probability_honest: float = Field(description="binomial p-value of n_invalid")
    fraud_detected: bool


class BatchesResponse(Wire):
    batches: list[ProofBatch]
    offset: int
    next_offset: int
    total: int


class PowStatusResponse(Wire):
    status: PowState
    node_state: NodeState
    is_model_initialized: bool
    block_hash: str | None = None
    block_height: int | None = None
    public_key: str | None = None
    r_target: float | None = None
    workers: int = 0
    nonces_computed: int = 0
    nonces_valid: int = 0
    batches: int = 0
    nonces_per_s: float = 0.0
    callbacks_sent: int = 0
    callback_errors: int = 0
    last_error: str | None = None


class InferenceUpRequest(Wire):
    model: str = Field(min_length=1, max_length=512, description="model id or local path")
    config: dict[str, Any] = Field(
        default_factory=dict, description="extra settings for the LLM app builder"
    )


InferenceStatusValue = Literal["deploying", "running", "failed"]


class InferenceStatus(Wire):
    model: str
    status: InferenceStatusValue
    app_name: str | None = None
    route_prefix: str | None = None
    error: str | None = None


class NodeStateResponse(Wire):
    state: NodeState
    pow: PowState
    inference: InferenceStatus | None = None


class Ack(Wire):
    status: Literal["OK"] = "OK"
    message: str
    state: NodeState
