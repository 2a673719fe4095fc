"""The HTTP plumbing of the fake nodes (``testnode``, ``zoo``): an aiohttp app with the
routes every OpenAI-compatible node has, JSON answers and OpenAI error bodies, serving an
app on a port (0 = a free one) and stopping it, in the caller's event loop or in a loop of
its own in a daemon thread, and waiting for a process's stop signal.

What a node answers is its own (``testnode/serving.py``, ``zoo/serving.py``); the JSON
field names are :mod:`cluster.wire.openai`'s.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from aiohttp import web

from cluster.wire import openai as wire

JSON_TYPE = "application/json"
MAX_REQUEST_BYTES = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as the nodes send it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type=JSON_TYPE)


def error_response(message: str, kind: str, status: int) -> web.Response:
    """An OpenAI error body (``kind``: ``invalid_request_error``, ``server_error``, ...)."""
    return json_response(wire.error_body(message, kind, status), status)


def invalid_request(exc: Exception) -> web.Response:
    """HTTP 400 for a request that does not parse or validate: the first line of the
    reason (pydantic's messages run over several)."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return error_response(message, "invalid_request_error", 400)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; :class:`ValueError` for anything else."""
    payload = json.loads(body)
    if not isinstance(payload, dict):
        raise ValueError("request body must be a JSON object")
    return payload


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def new_app() -> web.Application:
    """An empty app that takes request bodies up to :data:`MAX_REQUEST_BYTES`."""
    return web.Application(client_max_size=MAX_REQUEST_BYTES)


def openai_app(*, completions: Handler, chat: Handler, models: Handler,
               stats: Handler) -> web.Application:
    """An OpenAI-compatible node's app: completions, chat completions, the model list,
    ``GET /health`` and ``GET /stats`` (the node's counters, for tests)."""
    app = new_app()
    app.router.add_post(wire.COMPLETIONS_PATH, completions)
    app.router.add_post(wire.CHAT_PATH, chat)
    app.router.add_get(wire.MODELS_PATH, models)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app


class AppServer:
    """One app served on ``host:port`` in the running event loop. ``port`` 0 takes a free
    port; once started, ``port`` is the bound one (a restart reuses it)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 handler_cancellation: bool = False, backlog: int = 128) -> None:
        self.host = host
        self.port = port
        self.url: str | None = None
        self._handler_cancellation = handler_cancellation
        self._backlog = backlog
        self._runner: web.AppRunner | None = None

    @property
    def serving(self) -> bool:
        return self._runner is not None

    async def start(self, app: web.Application) -> str:
        """Serve ``app``; returns its base URL (``http://host:port``)."""
        if self._runner is not None:
            raise RuntimeError(f"already serving at {self.url}")
        runner = web.AppRunner(app, handler_cancellation=self._handler_cancellation,
                               shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, backlog=self._backlog,
                               reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if runner.addresses:
            self.port = int(runner.addresses[0][1])
        self.url = f"http://{self.host}:{self.port}"
        return self.url

    async def stop(self) -> bool:
        """Stop serving (the app's cleanup hooks run); False when it was not serving."""
        runner, self._runner = self._runner, None
        if runner is None:
            return False
        await runner.cleanup()
        return True


class LoopThread:
    """An event loop of its own in a daemon thread, for serving from synchronous code:
    :meth:`start` runs ``setup`` on it and returns its result; the loop then runs until
    :meth:`stop`, which runs ``teardown`` on it and joins the thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, setup: Callable[[], Awaitable[T]], teardown: Callable[[], Awaitable[Any]],
              *, name: str, timeout_s: float = 60.0) -> T:
        if self._thread is not None:
            raise RuntimeError(f"{name}: the loop thread already runs")
        loop = asyncio.new_event_loop()
        ready: Future[T] = Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                ready.set_result(loop.run_until_complete(setup()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                ready.set_exception(exc)
                loop.close()
                return
            loop.run_forever()
            loop.run_until_complete(teardown())
            loop.close()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._thread, self._loop = thread, loop
        try:
            return ready.result(timeout=timeout_s)
        except BaseException:
            self._thread = self._loop = None
            raise

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the loop (after ``teardown``); nothing when it does not run."""
        thread, loop = self._thread, self._loop
        self._thread = self._loop = None
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=timeout_s)


async def until_stop_signal() -> None:
    """Return once the process gets SIGINT or SIGTERM (how a fake node's process is
    stopped: ``cluster/local/processes.py``)."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
