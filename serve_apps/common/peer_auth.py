"""Peer authentication for any Serve app: a pure ASGI middleware.

``install_peer_auth(app, settings.auth, purpose="control")`` on a FastAPI/Starlette app
makes every route accept only requests signed by a key registered for ``purpose``
(:mod:`cluster.auth.peers` says how requests are signed and what is refused). A refused
request is answered here and never reaches a route, so it changes nothing.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``: the body has to be read (its
sha256 is signed) and handed on unchanged, and streaming answers must pass through as is.
Paths are checked as the client addressed them: ASGI's ``path`` includes the route prefix
Serve mounts the app under (``root_path``), as it does with uvicorn.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from cluster.auth.peers import AuthProblem, AuthRefused, RequestVerifier, verifier_from_settings
from cluster.core.settings import AuthSettings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class PeerAuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        verifier: RequestVerifier,
        max_body_bytes: int,
        exempt_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.max_body_bytes = max_body_bytes
        self.exempt_paths = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (and websockets, which no app here serves)
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if (path[len(root):] if path.startswith(root) else path) in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        body, messages = await self._read_body(receive)
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        try:
            if body is None:
                raise AuthRefused(AuthProblem.BODY_TOO_LARGE,
                                  f"the body is over {self.max_body_bytes} bytes")
            peer = await self.verifier.verify(
                scope["method"], path, scope.get("query_string", b"").decode("latin-1"),
                headers, body)
        except AuthRefused as refused:
            log.warning("peer_auth.refused method=%s path=%s reason=%s key=%s status=%d",
                        scope["method"], path, refused.problem.value,
                        headers.get("x-testbench-key-id", "-")[:64], refused.status)
            await _refuse(send, refused)
            return
        # routes may ask who called (request.state.peer_key_id)
        scope.setdefault("state", {})["peer_key_id"] = peer.key_id
        await self.app(scope, _replay(messages, receive), send)

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, list[Message]]:
        """The whole body (None when over the cap) and the messages that carried it."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None, messages
            if not message.get("more_body", False):
                break
        return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request"), messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the real channel."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _refuse(send: Send, refused: AuthRefused) -> None:
    body = json.dumps({"detail": refused.detail, "reason": refused.problem.value}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if refused.status == 401:
        headers.append((b"www-authenticate", b'Testbench-Ed25519 realm="testbench"'))
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install_peer_auth(
    app: Any,
    settings: AuthSettings,
    purpose: str,
    exempt_paths: Iterable[str] = (),
    clock: Callable[[], float] = time.time,
) -> bool:
    """Add the middleware to a FastAPI/Starlette ``app`` when auth is active; returns
    whether it did (auth is off without keys, or with ``enabled: false``)."""
    if not settings.active:
        log.info("peer_auth.off purpose=%s", purpose)
        return False
    nonces = None
    if settings.nonce_mongo_url:  # replicas share their nonces
        from cluster.storage.mongo import MongoNonceStore

        nonces = MongoNonceStore.from_url(settings.nonce_mongo_url,
                                          settings.nonce_mongo_database, clock)
    app.add_middleware(
        PeerAuthMiddleware,
        verifier=verifier_from_settings(settings, purpose, clock, nonces),
        max_body_bytes=settings.max_body_bytes,
        exempt_paths=tuple(exempt_paths),
    )
    log.info("peer_auth.on purpose=%s keys=%d", purpose, len(settings.keys))
    return True
