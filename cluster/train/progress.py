"""What a node reports about its training run (``GET /api/v1/train/status``)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from cluster.train.exchange import PeerStatus


class EvalPoint(BaseModel):
    """The held-out loss of the global parameters after ``outer_step`` outer steps."""

    model_config = ConfigDict(extra="forbid")

    outer_step: int
    loss: float


class TrainState(StrEnum):
    STARTING = "STARTING"  # preparing data, starting the Ray Train workers
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"  # stop requested; workers leave at the next inner step
    STOPPED = "STOPPED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def active(self) -> bool:
        return self in (TrainState.STARTING, TrainState.RUNNING, TrainState.STOPPING)


class CheckpointRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outer_step: int
    path: str
    params_sha256: str
    at: float = Field(description="seconds since the epoch")


class WorkerRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int
    pid: int
    host: str
    started_at: float


class RunProgress(BaseModel):
    """One node's view of its training run."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    state: TrainState = TrainState.STARTING
    node_public_key: str
    outer_steps: int = Field(description="outer steps the run will take")
    inner_steps: int = Field(description="H: inner steps per outer step")
    step: int = Field(default=0, description="inner steps done over the run (rank 0)")
    outer_step: int = Field(default=0, description="outer steps completed")
    inner_step: int = Field(default=0, description="inner steps done in the current outer step")
    loss: float | None = Field(default=None, description="last inner step's training loss")
    eval_loss: float | None = Field(default=None, description="held-out loss of the global "
                                    "parameters after the last outer step")
    eval_losses: list[EvalPoint] = Field(default_factory=list)
    tokens: int = Field(default=0, description="tokens trained on by this node's workers")
    tokens_per_s: float = Field(default=0.0, description="this node, last outer step's inner "
                                "steps")
    last_checkpoint: CheckpointRecord | None = None
    params_sha256: str | None = Field(default=None, description="sha256 of the global "
                                      "parameters after the last outer step")
    model_dir: str | None = Field(default=None, description="the exported model directory")
    workers: list[WorkerRecord] = Field(default_factory=list)
    worker_starts: int = Field(default=0, description="worker starts (restarts included)")
    peers: list[PeerStatus] = Field(default_factory=list)
    data_documents: int | None = None
    data_sha256: str | None = None
    error: str | None = None
    started_at: float
    updated_at: float
