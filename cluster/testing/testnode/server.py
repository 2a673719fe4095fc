"""The test node's HTTP surface (aiohttp.web): routes, injected faults and counters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from cluster.testing import http_server as http
from cluster.testing.testnode.behaviour import (
    Fault,
    NodeBehaviour,
    body_digest,
    choose_fault,
    fault_draw,
)
from cluster.testing.testnode.model import FakeModel
from cluster.testing.testnode.protocol import ChatRequest, CompletionRequest
from cluster.testing.testnode.serving import NodeServing
from cluster.testing.testnode.tokens import load_codec
from cluster.wire import openai as wire

log = logging.getLogger(__name__)

_HUGE_CHUNK = 64 * 1024
_HTML_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


def _batched_texts(body: bytes) -> bool:
    """Whether a request body's prompt is a list of several texts (how the verification
    round sends its probes; the loop's measuring prompts are one text or token ids)."""
    try:
        prompt = http.json_object(body).get("prompt")
    except ValueError:
        return False
    return isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt)


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
        app = http.openai_app(completions=self.completions, chat=self.chat_completions,
                              models=self.models, stats=self.get_stats)
        app.router.add_post("/stats/reset", self.reset_stats)
        return app

    # -- plain routes -------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return http.json_response(self.serving.models())

    async def get_stats(self, request: web.Request) -> web.Response:
        return http.json_response(self.stats.as_dict())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        self._seen.clear()
        return http.json_response({"status": "ok"})

    # -- model routes -------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._completions)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._chat)

    async def _completions(self, request: web.Request, payload: Any) -> web.StreamResponse:
        req = CompletionRequest.model_validate(payload)
        if req.stream:
            return await self._sse(request, self.serving.complete_stream(req))
        return http.json_response(self.serving.complete(req))

    async def _chat(self, request: web.Request, payload: Any) -> web.StreamResponse:
        req = ChatRequest.model_validate(payload)
        if req.stream:
            return await self._sse(request, self.serving.chat_stream(req))
        return http.json_response(self.serving.chat(req))

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
                return await render(request, http.json_object(body))
            except (ValueError, ValidationError) as exc:
                outcome = "bad_request"
                return http.invalid_request(exc)
        except asyncio.CancelledError:
            if outcome != Fault.DISCONNECT.value:
                outcome = f"{outcome}_cancelled"
            raise
        finally:
            self.stats.end(outcome)

    def _fault(self, behaviour: NodeBehaviour, body: bytes) -> Fault:
        if behaviour.evade_probes and _batched_texts(body):
            return Fault.UNAVAILABLE
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
            return http.error_response("injected internal error", "server_error", 500)
        if fault is Fault.UNAVAILABLE:
            return http.error_response("injected overload", "server_error", 503)
        if fault is Fault.RATE_LIMIT:
            resp = http.error_response("injected rate limit", "rate_limit_error", 429)
            resp.headers["Retry-After"] = "0"
            return resp
        if fault is Fault.INVALID_JSON:
            head, _ = wire.text_answer_frame(compact=False)
            return web.Response(body=head + b"unterminated", content_type=http.JSON_TYPE)
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
        resp = web.StreamResponse(status=200, headers={"Content-Type": http.JSON_TYPE})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        head, tail = wire.text_answer_frame()
        chunk = head + b"x" * (_HUGE_CHUNK - 20)
        filler = b"x" * _HUGE_CHUNK
        sent = 0
        try:
            while sent < size:
                await resp.write(chunk if sent == 0 else filler)
                sent += _HUGE_CHUNK
            await resp.write(tail)
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
            await resp.write(b"data: " + http.dumps(event) + b"\n\n")
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
        self.model_name = model_name
        self.app = NodeApp(behaviour or NodeBehaviour(), tokenizer_path, model_name, clock)
        self._server = http.AppServer(host, port, handler_cancellation=True, backlog=1024)
        self._thread = http.LoopThread()

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        """The port asked for; once started, the bound one."""
        return self._server.port

    @property
    def base_url(self) -> str | None:
        return self._server.url

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
        if self._server.serving:
            raise RuntimeError("test node already started")
        url = await self._server.start(self.app.build())
        log.info(
            "testnode_started url=%s mode=%s faults=%s",
            url,
            self.behaviour.mode,
            self.behaviour.has_faults,
        )
        return url

    def stop(self) -> Awaitable[None]:
        """Stop serving. Await it in async code; in thread mode it stops synchronously."""
        if self._thread.running:
            self._thread.stop()
            return _Done()
        return self._stop_async()

    async def _stop_async(self) -> None:
        if await self._server.stop():
            log.info("testnode_stopped url=%s", self.base_url)

    def start_in_thread(self) -> str:
        """Start serving on a fresh event loop in a daemon thread; returns the base URL."""
        if self._thread.running:
            raise RuntimeError("test node already started")
        return self._thread.start(self.start, self._stop_async, name=f"testnode-{self.port}")
