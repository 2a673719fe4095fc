"""The fake nodes' HTTP plumbing: an OpenAI-shaped app on a free port, its JSON errors, and
serving it from synchronous code in a loop thread."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from aiohttp import web

from cluster.testing import http_server as http


async def _echo(request: web.Request) -> web.Response:
    try:
        return http.json_response(http.json_object(await request.read()))
    except ValueError as exc:
        return http.invalid_request(exc)


async def _stats(request: web.Request) -> web.Response:
    return http.json_response({"by_path": {}})


def _app() -> web.Application:
    return http.openai_app(completions=_echo, chat=_echo, models=_stats, stats=_stats)


def _post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_server_in_a_loop_thread_answers_json_and_openai_errors_then_stops() -> None:
    server = http.AppServer()
    thread = http.LoopThread()
    url = thread.start(lambda: server.start(_app()), server.stop, name="http-test")
    try:
        assert server.port != 0 and url == f"http://127.0.0.1:{server.port}"
        assert _post(url + "/v1/completions", b'{"prompt": "\xc3\xa9"}') == (200, {"prompt": "é"})
        status, body = _post(url + "/v1/chat/completions", b"[1]")
        assert status == 400
        assert body["error"] == {"message": "request body must be a JSON object",
                                 "type": "invalid_request_error", "code": 400}
        with urllib.request.urlopen(url + "/health", timeout=10) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
    finally:
        thread.stop()
    assert not server.serving and not thread.running


async def test_a_restarted_server_takes_its_bound_port_again() -> None:
    server = http.AppServer()
    first = await server.start(_app())
    assert await server.stop()
    try:
        assert await server.start(_app()) == first
    finally:
        await server.stop()
    assert not await server.stop()
