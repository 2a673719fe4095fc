"""Driving an MLNode's training routes over HTTP (``testbench train``; a Network Node).

Requests go through the node transport (``cluster/nodes/transport.py``), signed with the
caller's control key when it has one (``cluster/auth/peers.py::RequestSigner``), under the
endpoint policy (``cluster/nodes/policy.py``; ``testbench train``: the Requester's
``requester.endpoint_allowlist``). An answer
the node refuses (409 another service runs, 503 no training key, 422 a bad body) comes back
as :class:`NodeRefused` with the node's own explanation.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import aiohttp

from cluster.core.errors import NodeError
from cluster.nodes.policy import EndpointGuard
from cluster.nodes.transport import NodeTransport
from cluster.train.config import TrainRunConfig
from cluster.train.progress import RunProgress

if TYPE_CHECKING:
    from cluster.auth.peers import RequestSigner

API = "/api/v1"


class NodeRefused(NodeError):
    """The node answered with an error status; ``detail`` is what it said."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class TrainingClient:
    """One MLNode's training routes (``{url}/api/v1/train/...``); ``guard``: the endpoint
    policy of its connections (default: public addresses only)."""

    def __init__(self, url: str, signer: RequestSigner | None = None,
                 timeout_s: float = 60.0, guard: EndpointGuard | None = None) -> None:
        self.url = url.rstrip("/")
        middlewares = (signer.aiohttp_middleware,) if signer is not None else ()
        self._transport = NodeTransport.open(
            max_connections=4, middlewares=middlewares,
            guard=EndpointGuard.of() if guard is None else guard)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else None
        answer = await self._transport.exchange_bytes(method, f"{self.url}{API}{path}", data,
                                                      self._timeout, headers=headers)
        try:
            parsed = json.loads(answer.body)
        except ValueError:
            parsed = None
        if not 200 <= answer.status < 300:
            detail = parsed.get("detail") if isinstance(parsed, dict) else None
            if not isinstance(detail, str):
                detail = json.dumps(detail) if detail is not None else \
                    answer.body[:300].decode("utf-8", "replace")
            raise NodeRefused(answer.status, detail)
        if not isinstance(parsed, dict):
            raise NodeError(f"{method} {path}: the node answered no JSON object")
        return parsed

    async def start(self, run: TrainRunConfig) -> dict[str, Any]:
        return await self._call("POST", "/train/start", run.model_dump(mode="json"))

    async def stop(self) -> dict[str, Any]:
        return await self._call("POST", "/train/stop")

    async def status(self) -> tuple[str, str | None, RunProgress | None]:
        """(the node's state, its training key, its last run)."""
        body = await self._call("GET", "/train/status")
        run = body.get("run")
        return (str(body.get("node_state")), body.get("node_public_key"),
                RunProgress.model_validate(run) if run is not None else None)

    async def close(self) -> None:
        await self._transport.close()
