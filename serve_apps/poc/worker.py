"""The PoC worker: one process's share of nonce generation (``ray.remote`` in app.py).

Plain class: the same object runs in a unit test, in-process, or as a Ray actor. torch
is imported when a worker is built, so the node's ingress process never loads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from cluster.poc.config import PocRoundParams


@dataclass(frozen=True)
class NonceChunk:
    """``count`` nonces ``offset + stride * k`` for k in [start, start + count)."""

    start: int
    count: int
    stride: int = 1
    offset: int = 0

    def nonces(self) -> range:
        first = self.offset + self.stride * self.start
        return range(first, first + self.stride * self.count, self.stride)


@dataclass(frozen=True)
class GeneratedChunk:
    chunk: NonceChunk
    nonces: list[int]
    distances: list[float]
    compute_s: float


class PowWorkerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: PocRoundParams
    public_key: str = Field(min_length=1)
    threads: int = Field(default=1, ge=1, description="torch intra-op threads")
    device: str = "cpu"


class PowWorker:
    def __init__(self, spec: PowWorkerSpec, timer: Callable[[], float] = time.perf_counter) -> None:
        from cluster.poc.compute import PocComputer, configure_torch

        configure_torch(spec.threads)
        self._spec = spec
        self._timer = timer
        self._computer = PocComputer(spec.round, spec.public_key, spec.device)

    def ready(self) -> str:
        """The sha256 of the round's weights (every worker must agree)."""
        return self._computer.weights_digest()

    def generate(self, chunk: NonceChunk) -> GeneratedChunk:
        started = self._timer()
        nonces, dist = self._computer.find_valid(chunk.nonces())
        return GeneratedChunk(chunk, nonces, dist, self._timer() - started)

    def cpu_seconds(self) -> float:
        """CPU time this worker's process has used (its share of a bench's CPU budget)."""
        return time.process_time()

    def distances(self, public_key: str, nonces: list[int]) -> list[float]:
        """Recompute distances for any node's key (the node-side validation phase)."""
        return self._computer.with_key(public_key).compute_distances(nonces).tolist()
