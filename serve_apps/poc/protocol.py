"""The node app's wire models.

The PoC and control models are also spoken by the validator that drives a round
(``cluster/poc/round.py``), so they live in ``cluster/poc/protocol.py``; this is the app's
view of them. The training routes' models are below: their bodies are the run's config and
the run's progress (``cluster/train/config.py``, ``cluster/train/progress.py``), which the
Ray Train workers and ``testbench train`` share.
"""

from __future__ import annotations

from pydantic import Field

from cluster.poc.protocol import (
    Ack,
    BatchesResponse,
    InferenceStatus,
    InferenceUpRequest,
    NodeState,
    NodeStateResponse,
    PowInitRequest,
    PowState,
    PowStatusResponse,
    ProofBatch,
    ValidatedBatch,
    Wire,
)
from cluster.train.config import TrainRunConfig
from cluster.train.progress import RunProgress


class TrainStartRequest(TrainRunConfig):
    """``POST /api/v1/train/start``: the training run this node joins (run id, model
    directory, dataset, DiLoCo hyper-parameters, the other nodes' keys and URLs, output
    directory). Every node of the run gets the same request, each with the others as
    ``peers``."""


class TrainStatusResponse(Wire):
    """``GET /api/v1/train/status``: what the node runs, and its last training run."""

    node_state: NodeState
    node_public_key: str | None = Field(default=None, description="the key this node signs "
                                        "its outer-sync messages with (none: cannot train)")
    run: RunProgress | None = None


class SyncAccepted(Wire):
    """``POST /api/v1/train/sync`` accepted a peer's message (refusals: ``{detail, reason}``,
    see ``cluster/auth/sync_messages.py``)."""

    status: str = "accepted"
    run_id: str
    outer_step: int


__all__ = [
    "Wire",
    "NodeState",
    "PowState",
    "PowInitRequest",
    "ProofBatch",
    "ValidatedBatch",
    "BatchesResponse",
    "PowStatusResponse",
    "InferenceUpRequest",
    "InferenceStatus",
    "NodeStateResponse",
    "Ack",
    "TrainStartRequest",
    "TrainStatusResponse",
    "SyncAccepted",
]
