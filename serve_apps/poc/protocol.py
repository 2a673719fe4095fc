"""The PoC app's wire models. The validator that drives a round (``cluster/poc/round.py``)
speaks the same models, so they live in ``cluster/poc/protocol.py``; this is the app's view."""

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
]
