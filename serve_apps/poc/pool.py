"""Where PoC workers run: the interface the node service drives, and an in-process pool.

The Ray pool (actors sized by config) is built in app.py, the package's one Ray place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from serve_apps.poc.worker import GeneratedChunk, NonceChunk, PowWorker, PowWorkerSpec


class WorkerPool(Protocol):
    @property
    def size(self) -> int: ...

    async def ready(self) -> list[str]: ...

    async def generate(self, worker: int, chunk: NonceChunk) -> GeneratedChunk: ...

    async def distances(self, worker: int, public_key: str, nonces: list[int]) -> list[float]: ...

    async def close(self) -> None: ...


# Called on the event loop: it must return quickly (start workers); ``ready`` waits for them.
WorkerPoolFactory = Callable[[PowWorkerSpec], WorkerPool]


class LocalWorkerPool:
    """Workers in this process, each call in a thread (tests, and a single-box fallback)."""

    def __init__(self, spec: PowWorkerSpec, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._workers = [PowWorker(spec) for _ in range(workers)]

    @property
    def size(self) -> int:
        return len(self._workers)

    async def ready(self) -> list[str]:
        return [w.ready() for w in self._workers]

    async def generate(self, worker: int, chunk: NonceChunk) -> GeneratedChunk:
        return await asyncio.to_thread(self._workers[worker].generate, chunk)

    async def distances(self, worker: int, public_key: str, nonces: list[int]) -> list[float]:
        return await asyncio.to_thread(self._workers[worker].distances, public_key, nonces)

    async def close(self) -> None:
        self._workers.clear()
