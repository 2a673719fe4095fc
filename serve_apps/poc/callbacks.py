"""Posting batches to the round's callback URL, in order, off the generation path."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)


class CallbackSender(Protocol):
    async def post(self, url: str, payload: dict[str, Any]) -> None:
        """POST ``payload`` as JSON; raise on a transport error or a non-2xx answer."""
        ...

    async def close(self) -> None: ...


class AiohttpCallbackSender:
    def __init__(self, timeout_s: float = 10.0) -> None:
        self._timeout_s = timeout_s
        self._session: Any = None

    async def post(self, url: str, payload: dict[str, Any]) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s)
            )
        async with self._session.post(url, json=payload) as resp:
            if resp.status >= 300:
                body = (await resp.text())[:200]
                raise RuntimeError(f"callback {url} answered HTTP {resp.status}: {body}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class CallbackQueue:
    """One sender task per round: posts queued payloads in order, counts failures.

    A failed post is logged and counted (``errors``, ``last_error``), never retried
    forever and never allowed to stall generation; the batch stays stored on the node.
    """

    def __init__(self, sender: CallbackSender) -> None:
        self._sender = sender
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.errors = 0
        self.last_error: str | None = None

    def put(self, url: str, payload: dict[str, Any]) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())
        self._queue.put_nowait((url, payload))

    async def _drain(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            url, payload = item
            try:
                await self._sender.post(url, payload)
                self.sent += 1
            except Exception as exc:  # noqa: BLE001 - recorded, surfaced in /pow/status
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("poc.callback.failed url=%s error=%s", url, self.last_error)

    async def close(self, flush_timeout_s: float = 10.0) -> None:
        """Send what is queued (for at most ``flush_timeout_s``), then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        self._queue.put_nowait(None)
        done, _ = await asyncio.wait([task], timeout=flush_timeout_s)
        if not done:
            left = self._queue.qsize()  # queued + the sentinel = unsent incl. the one in flight
            self.errors += left
            self.last_error = f"{left} callbacks unsent after {flush_timeout_s:.0f}s flush"
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
