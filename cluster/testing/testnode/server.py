"""The test node's HTTP surface (aiohttp.web): routes, injected faults and counters."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Generator, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from cluster.testing.testnode import protocol as wire
from cluster.testing.testnode.behaviour import (
    Fault,
    NodeBehaviour,
    body_digest,
    choose_fault,
    fault_draw,
)
from cluster.testing.testnode.model import FakeModel
from cluster.testing.testnode.serving import NodeServing
from cluster.testing.testnode.tokens import load_codec

log = logging.getLogger(__name__)

_JSON = "application/json"
_HUGE_CHUNK = 64 * 1024
_HTML_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type=_JSON)


class NodeStats:
    """Request counters of one node (served at ``GET /stats``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_path: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()

    def begin(self, path: str) -> None:
        self.requests += 1
        self.by_path[path] += 1
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def end(self, outcome: str) -> None:
        self.in_flight -= 1
        self.by_outcome[outcome] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "by_path": dict(self.by_path),
            "by_outcome": dict(self.by_outcome),
        }


class NodeApp:
    """Routes of one test node. The behaviour can be swapped while it runs."""

    def __init__(
        self,
        behaviour: NodeBehaviour,
        tokenizer_path: str | Path | None,
        model_name: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._codec = load_codec(tokenizer_path)
        self._model_name = model_name
        self._clock = clock
        self.stats = NodeStats()
        self._seen: Counter[bytes] = Counter()
        self.behaviour = behaviour

    @property
    def behaviour(self) -> NodeBehaviour:
        return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: NodeBehaviour) -> None:
        self._behaviour = behaviour
        self.serving = NodeServing(
            FakeModel(self._codec, behaviour.mode), self._model_name, self._clock
        )
        self._seen.clear()

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/stats/reset", self.reset_stats)
        return app

    # -- plain routes -------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return _json_response(self.serving.models())

    async def health(self, request: web.Request) -> web.Response:
        return _json_response({"status": "ok"})

    async def get_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.stats.as_dict())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        self._seen.clear()
        return _json_response({"status": "ok"})

    # -- model routes -------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._completions)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._chat)

    async def _completions(self, request: web.Request, payload: Any) -> web.StreamResponse:
        req = wire.CompletionRequest.model_validate(payload)
        if req.stream:
            return await self._sse(request, self.serving.complete_stream(req))
        return _json_response(self.serving.complete(req))

    async def _chat(self, request: web.Request, payload: Any) -> web.StreamResponse:
        req = wire.ChatRequest.model_validate(payload)
        if req.stream:
            return await self._sse(request, self.serving.chat_stream(req))
        return _json_response(self.serving.chat(req))

    async def _serve(
        self,
        request: web.Request,
        render: Callable[[web.Request, Any], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        body = await request.read()
        behaviour = self._behaviour
        self.stats.begin(request.path)
        outcome = "ok"
        try:
            fault = self._fault(behaviour, body)
            outcome = "ok" if fault is Fault.NONE else fault.value
            if fault is Fault.HANG:
                await asyncio.Event().wait()  # until the client gives up (handler cancelled)
            if behaviour.latency_s > 0:
                await asyncio.sleep(behaviour.latency_s)
            if fault is not Fault.NONE:
                return await self._fault_response(request, fault, behaviour)
            try:
                payload = json.loads(body)
                if not isinstance(payload, dict):
                    raise ValueError("request body must be a JSON object")
                return await render(request, payload)
            except (ValueError, ValidationError) as exc:
                outcome = "bad_request"
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return _json_response(wire.error_body(message, "invalid_request_error", 400), 400)
        except asyncio.CancelledError:
            if outcome != Fault.DISCONNECT.value:
                outcome = f"{outcome}_cancelled"
            raise
        finally:
            self.stats.end(outcome)

    def _fault(self, behaviour: NodeBehaviour, body: bytes) -> Fault:
        if not behaviour.has_faults:
            return Fault.NONE
        digest = body_digest(body)
        occurrence = self._seen[digest]
        self._seen[digest] = occurrence + 1
        return choose_fault(behaviour, fault_draw(behaviour.seed, digest, occurrence))

    async def _fault_response(
        self, request: web.Request, fault: Fault, behaviour: NodeBehaviour
    ) -> web.StreamResponse:
        if fault is Fault.ERROR:
            return _json_response(wire.error_body("injected internal error", "server_error", 500), 500)
        if fault is Fault.UNAVAILABLE:
            return _json_response(wire.error_body("injected overload", "server_error", 503), 503)
        if fault is Fault.RATE_LIMIT:
            body = wire.error_body("injected rate limit", "rate_limit_error", 429)
            resp = _json_response(body, 429)
            resp.headers["Retry-After"] = "0"
            return resp
        if fault is Fault.INVALID_JSON:
            return web.Response(body=b'{"choices": [{"text": "unterminated', content_type=_JSON)
        if fault is Fault.WRONG_CONTENT_TYPE:
            return web.Response(body=_HTML_PAGE, content_type="text/html")
        if fault is Fault.HUGE_BODY:
            return await self._huge_body(request, behaviour.huge_body_bytes)
        if fault is Fault.DISCONNECT:
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError  # nothing to send: the connection is gone
        raise AssertionError(f"unhandled fault {fault}")

    async def _huge_body(self, request: web.Request, size: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": _JSON})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b'{"choices":[{"text":"' + b"x" * (_HUGE_CHUNK - 20)
        filler = b"x" * _HUGE_CHUNK
        sent = 0
        try:
            while sent < size:
                await resp.write(chunk if sent == 0 else filler)
                sent += _HUGE_CHUNK
            await resp.write(b'"}]}')
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client gave up, as it should
        return resp

    async def _sse(
        self, request: web.Request, events: Iterator[dict[str, Any]]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        for event in events:
            await resp.write(b"data: " + _dumps(event) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class _Done:
    """An awaitable that is already done (``stop()`` in thread mode may be awaited or not)."""

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


class TestNode:
    """A real OpenAI-compatible HTTP server with scripted behaviour, for tests and benches.

    Use ``await start()`` / ``await stop()`` inside an event loop, or ``start_in_thread()`` /
    ``stop()`` from synchronous code (the server then runs its own loop in a daemon thread).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        behaviour: NodeBehaviour | None = None,
        tokenizer_path: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str = "smollm2",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.port = port
        self.model_name = model_name
        self.app = NodeApp(behaviour or NodeBehaviour(), tokenizer_path, model_name, clock)
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.base_url: str | None = None

    @property
    def behaviour(self) -> NodeBehaviour:
        return self.app.behaviour

    @behaviour.setter
    def behaviour(self, behaviour: NodeBehaviour) -> None:
        self.app.behaviour = behaviour

    @property
    def stats(self) -> NodeStats:
        return self.app.stats

    async def start(self) -> str:
        """Start serving; returns the base URL (``http://host:port``, no ``/v1``)."""
        if self._runner is not None:
            raise RuntimeError("test node already started")
        runner = web.AppRunner(
            self.app.build(), handler_cancellation=True, shutdown_timeout=0.5, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=1024, reuse_address=True)
        await site.start()
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.port
        self.base_url = f"http://{self.host}:{self.port}"
        log.info(
            "testnode_started url=%s mode=%s faults=%s",
            self.base_url,
            self.behaviour.mode,
            self.behaviour.has_faults,
        )
        return self.base_url

    def stop(self) -> Awaitable[None]:
        """Stop serving. Await it in async code; in thread mode it stops synchronously."""
        if self._thread is not None:
            self._stop_thread()
            return _Done()
        return self._stop_async()

    async def _stop_async(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("testnode_stopped url=%s", self.base_url)

    def start_in_thread(self) -> str:
        """Start serving on a fresh event loop in a daemon thread; returns the base URL."""
        if self._thread is not None:
            raise RuntimeError("test node already started")
        loop = asyncio.new_event_loop()
        ready: Future[str] = Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                ready.set_result(loop.run_until_complete(self.start()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                ready.set_exception(exc)
                return
            loop.run_forever()
            loop.run_until_complete(self._stop_async())
            loop.close()

        thread = threading.Thread(target=run, name=f"testnode-{self.port}", daemon=True)
        thread.start()
        self._thread, self._loop = thread, loop
        try:
            return ready.result(timeout=60)
        except BaseException:
            self._thread = self._loop = None
            raise

    def _stop_thread(self) -> None:
        thread, loop = self._thread, self._loop
        self._thread = self._loop = None
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
