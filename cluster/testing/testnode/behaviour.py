"""How a test node behaves: honest or wrong answers, latency, and injected faults.

Fault choice is deterministic: it is drawn from a hash of ``(seed, request body, n)``
where ``n`` counts how often the node has already seen that exact body. A replayed run
(the same requests in the same order) sees the same faults, distinct bodies spread
evenly over the rates, and a retry of the same body gets a fresh draw.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Rate = float


class Fault(StrEnum):
    """What a node does with one request instead of answering it properly."""

    NONE = "none"
    ERROR = "error"  # HTTP 500
    UNAVAILABLE = "unavailable"  # HTTP 503 (retryable)
    RATE_LIMIT = "rate_limit"  # HTTP 429 (retryable)
    DISCONNECT = "disconnect"  # connection closed before any response
    HANG = "hang"  # never answers
    INVALID_JSON = "invalid_json"  # 200 with a body that is not JSON
    HUGE_BODY = "huge_body"  # 200 with a body far above any sane cap
    WRONG_CONTENT_TYPE = "wrong_content_type"  # 200 text/html error page


class NodeBehaviour(BaseModel):
    """The behaviour of a :class:`~cluster.testing.testnode.TestNode`.

    Rates are probabilities per request, in [0, 1], and together at most 1.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["correct", "wrong"] = "correct"
    latency_s: float = Field(default=0.0, ge=0, description="added before answering")
    error_rate: Rate = Field(default=0.0, ge=0, le=1, description="HTTP 500")
    unavailable_rate: Rate = Field(default=0.0, ge=0, le=1, description="HTTP 503")
    rate_limit_rate: Rate = Field(default=0.0, ge=0, le=1, description="HTTP 429")
    disconnect_rate: Rate = Field(
        default=0.0, ge=0, le=1, description="close the connection without answering"
    )
    hang_rate: Rate = Field(default=0.0, ge=0, le=1, description="never answer")
    invalid_json_rate: Rate = Field(default=0.0, ge=0, le=1, description="200 with garbage")
    huge_body_rate: Rate = Field(default=0.0, ge=0, le=1, description="200 with a huge body")
    wrong_content_type_rate: Rate = Field(
        default=0.0, ge=0, le=1, description="200 text/html page"
    )
    huge_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    seed: int = 0
    evade_probes: bool = Field(
        default=False,
        description="an evader: HTTP 503 to every request whose prompt is a list of several "
        "texts (the verification round's batched probes) and to nothing else",
    )

    @model_validator(mode="after")
    def _rates_sum(self) -> NodeBehaviour:
        total = sum(rate for _, rate in self.fault_rates())
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total:.3f}, more than 1")
        return self

    def fault_rates(self) -> list[tuple[Fault, float]]:
        return [
            (Fault.ERROR, self.error_rate),
            (Fault.UNAVAILABLE, self.unavailable_rate),
            (Fault.RATE_LIMIT, self.rate_limit_rate),
            (Fault.DISCONNECT, self.disconnect_rate),
            (Fault.HANG, self.hang_rate),
            (Fault.INVALID_JSON, self.invalid_json_rate),
            (Fault.HUGE_BODY, self.huge_body_rate),
            (Fault.WRONG_CONTENT_TYPE, self.wrong_content_type_rate),
        ]

    @property
    def has_faults(self) -> bool:
        return any(rate > 0 for _, rate in self.fault_rates())


def body_digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def fault_draw(seed: int, digest: bytes, occurrence: int) -> float:
    """A uniform number in [0, 1) determined by (seed, body digest, occurrence)."""
    h = hashlib.blake2b(digest, digest_size=8, key=f"{seed}:{occurrence}".encode())
    return int.from_bytes(h.digest(), "big") / float(1 << 64)


def choose_fault(behaviour: NodeBehaviour, draw: float) -> Fault:
    """Map a uniform draw onto the fault rates (cumulative, in a fixed order)."""
    edge = 0.0
    for fault, rate in behaviour.fault_rates():
        edge += rate
        if draw < edge:
            return fault
    return Fault.NONE
