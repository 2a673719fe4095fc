"""HTTP access to an untrusted node for the honesty checks (aiohttp, JSON in and out).

Failures are typed: :class:`NodeUnavailable` when the node cannot be reached, times out or
answers with an HTTP error (the check is then *unknown*, not failed: a network blip must
not brand an honest node), :class:`~cluster.wire.openai.MalformedAnswer` when it
answers 200 with something else (a node fault).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from cluster.core.errors import NodeError
from cluster.wire.openai import MalformedAnswer

MAX_ANSWER_BYTES = 16 * 1024 * 1024  # honesty answers are small; a huge one is a fault


class NodeUnavailable(NodeError):
    """The node did not answer (connection, timeout) or answered with an HTTP error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NodeClient:
    """One node's base URL (``http://host:port``, routes below it) over a shared session."""

    def __init__(
        self,
        base_url: str,
        http: aiohttp.ClientSession,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock

    async def _read(self, resp: aiohttp.ClientResponse, path: str) -> bytes:
        raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
        if len(raw) > MAX_ANSWER_BYTES:
            raise MalformedAnswer(f"{path}: answer over {MAX_ANSWER_BYTES} bytes")
        return raw

    @staticmethod
    def _json(raw: bytes, path: str) -> Any:
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise MalformedAnswer(f"{path}: answer is not JSON: {raw[:120]!r}") from exc

    async def post_json(self, path: str, body: Mapping[str, Any]) -> tuple[Any, float]:
        """POST ``body``; returns the decoded answer and the latency in seconds."""
        started = self._clock()
        try:
            async with self._http.post(self.base_url + path, json=dict(body),
                                       timeout=self._timeout) as resp:
                raw = await self._read(resp, path)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise NodeUnavailable(f"{path}: {type(exc).__name__}: {exc}") from exc
        latency = self._clock() - started
        if status != 200:
            raise NodeUnavailable(f"{path}: HTTP {status}: {raw[:200]!r}", status)
        return self._json(raw, path), latency

    async def get_json(self, path: str) -> Any:
        """GET a JSON document; :class:`NodeUnavailable` (with ``status``) when not 200."""
        try:
            async with self._http.get(self.base_url + path, timeout=self._timeout) as resp:
                raw = await self._read(resp, path)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise NodeUnavailable(f"{path}: {type(exc).__name__}: {exc}") from exc
        if status != 200:
            raise NodeUnavailable(f"{path}: HTTP {status}", status)
        return self._json(raw, path)
