"""The generation loop: keeps every worker busy with nonce chunks and collects the valid ones.

Each worker has ``chunks_in_flight`` chunks queued so it never waits on the loop; chunk
``k`` covers indices [k * chunk_size, (k + 1) * chunk_size) of this node's nonce stream
``node_id + node_count * i``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve_apps.poc.pool import WorkerPool
from serve_apps.poc.worker import GeneratedChunk, NonceChunk


@dataclass(frozen=True)
class NoncePlan:
    chunk_size: int
    stride: int = 1
    offset: int = 0

    def chunk(self, k: int) -> NonceChunk:
        return NonceChunk(start=k * self.chunk_size, count=self.chunk_size,
                          stride=self.stride, offset=self.offset)


class PowGenerator:
    def __init__(
        self,
        pool: WorkerPool,
        plan: NoncePlan,
        on_chunk: Callable[[GeneratedChunk], None],
        chunks_in_flight: int = 2,
        clock: Callable[[], float] = time.monotonic,
        first_chunk: int = 0,
    ) -> None:
        self._pool = pool
        self._plan = plan
        self._on_chunk = on_chunk
        self._in_flight = max(1, chunks_in_flight)
        self._clock = clock
        self._next_chunk = first_chunk
        self._stopping = False
        self.nonces_computed = 0
        self.nonces_valid = 0
        self.compute_s = 0.0
        self.started_at: float | None = None
        self.elapsed_s = 0.0

    @property
    def next_chunk(self) -> int:
        """The index of the next chunk to hand out (where a resumed run continues)."""
        return self._next_chunk

    def request_stop(self) -> None:
        """Hand out no more chunks; ``run`` returns once those in flight are recorded."""
        self._stopping = True

    def nonces_per_s(self) -> float:
        elapsed = self.elapsed_s if self.started_at is None else self._clock() - self.started_at
        return self.nonces_computed / elapsed if elapsed > 0 else 0.0

    def _submit(self, worker: int) -> asyncio.Task[GeneratedChunk]:
        chunk = self._plan.chunk(self._next_chunk)
        self._next_chunk += 1
        return asyncio.ensure_future(self._pool.generate(worker, chunk))

    async def run(self, max_chunks: int | None = None) -> None:
        """Generate until stopped (or cancelled), or until ``max_chunks`` chunks are done."""
        self.started_at = self._clock()
        pending: dict[asyncio.Future[GeneratedChunk], int] = {}

        def more() -> bool:
            return not self._stopping and (max_chunks is None or self._next_chunk < max_chunks)

        try:
            for _ in range(self._in_flight):
                for w in range(self._pool.size):
                    if more():
                        pending[self._submit(w)] = w
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    worker = pending.pop(fut)
                    result = fut.result()
                    self.nonces_computed += result.chunk.count
                    self.nonces_valid += len(result.nonces)
                    self.compute_s += result.compute_s
                    self._on_chunk(result)
                    if more():
                        pending[self._submit(worker)] = worker
        finally:
            for fut in pending:
                fut.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.elapsed_s = self._clock() - self.started_at
            self.started_at = None
