"""The node transport against a real aiohttp server: the same bounded exchange whether the
session is the transport's own or a caller's (the honesty checks pass theirs)."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from cluster.nodes.transport import NodeEndpoint, NodeTransport, NodeUnavailable
from cluster.wire.openai import MalformedAnswer

CAP = 50_000
SSE_EVENTS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]


class Server:
    def __init__(self) -> None:
        self.seen: list[tuple[str | None, bytes]] = []
        app = web.Application()
        app.router.add_route("*", "/ok", self.ok)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/big", self.big)
        app.router.add_get("/gzip", self.gzipped)
        app.router.add_get("/list", self.json_list)
        app.router.add_get("/busy", self.busy)
        app.router.add_post("/stream", self.stream)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def ok(self, request: web.Request) -> web.Response:
        self.seen.append((request.headers.get("Accept-Encoding"), await request.read()))
        return web.json_response({"ok": True})

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    async def big(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no Content-Length to refuse it by
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"x" * 10_000)
        return resp

    async def gzipped(self, request: web.Request) -> web.Response:
        body = gzip.compress(json.dumps({"inflated": True}).encode())
        return web.Response(body=body, content_type="application/json",
                            headers={"Content-Encoding": "gzip"})

    async def json_list(self, request: web.Request) -> web.Response:
        return web.json_response([1, 2])

    async def busy(self, request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy", headers={"Retry-After": "2"})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events, chunked; echoes the request's ``X-Request-Id``."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "X-Request-Id": request.headers.get("X-Request-Id", "")})
        await resp.prepare(request)
        for event in SSE_EVENTS:
            await resp.write(event)
        return resp


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[Server]:
    s = Server()
    await s.start()
    yield s
    await s.runner.cleanup()


@pytest.fixture(params=["own session", "caller's session"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[NodeTransport]:
    if request.param == "own session":
        t = NodeTransport.open(size_cap=CAP)
        yield t
        await t.close()
        assert t.closed
    else:
        async with aiohttp.ClientSession() as session:
            t = NodeTransport(session, size_cap=CAP)
            yield t
            await t.close()
            assert not session.closed  # a caller's session stays the caller's


async def test_a_json_object_comes_back_uncompressed(server: Server, transport: NodeTransport
                                                     ) -> None:
    node = NodeEndpoint(server.url, transport, timeout_s=5.0)
    answer, latency = await node.post_json("/ok", {"prompt": "é"})
    assert answer == {"ok": True} and latency > 0
    assert server.seen[-1] == ("identity", '{"prompt":"é"}'.encode())


@pytest.mark.parametrize(("path", "error", "status", "message"), [
    ("/redirect", NodeUnavailable, 302, "/redirect: HTTP 302"),
    ("/busy", NodeUnavailable, 503, "/busy: HTTP 503: busy"),
    ("/big", MalformedAnswer, 200, f"/big: response exceeded {CAP} bytes"),
    ("/gzip", MalformedAnswer, 200, "/gzip: invalid JSON body"),
    ("/list", MalformedAnswer, 200, "/list: response is a JSON list, not an object"),
])
async def test_each_failure_is_typed_with_its_status(
    server: Server, transport: NodeTransport, path: str, error: type[Exception], status: int,
    message: str,
) -> None:
    node = NodeEndpoint(server.url, transport, timeout_s=5.0)
    with pytest.raises(error) as caught:
        await node.get_json(path)
    assert caught.value.status == status  # type: ignore[attr-defined]
    assert str(caught.value).startswith(message)


async def test_a_busy_node_may_be_retried_after_its_retry_after(
    server: Server, transport: NodeTransport
) -> None:
    with pytest.raises(NodeUnavailable) as caught:
        await transport.exchange("GET", server.url + "/busy", None,
                                 aiohttp.ClientTimeout(total=5.0))
    assert caught.value.retryable and caught.value.retry_after_s == 2.0


async def test_a_refused_connection_is_unavailable_and_retryable(transport: NodeTransport
                                                                 ) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NodeUnavailable, match="before the response") as caught:
        await transport.exchange("GET", f"http://127.0.0.1:{port}/", None,
                                 aiohttp.ClientTimeout(total=5.0))
    assert caught.value.retryable and caught.value.status is None


async def test_exchange_bytes_gives_a_stream_byte_for_byte_with_its_headers(
    server: Server, transport: NodeTransport
) -> None:
    answer = await transport.exchange_bytes("POST", server.url + "/stream", b"{}",
                                            aiohttp.ClientTimeout(total=5.0),
                                            headers={"X-Request-Id": "r-1"})
    assert answer.status == 200 and answer.body == b"".join(SSE_EVENTS)
    assert answer.headers["Content-Type"] == "text/event-stream"
    assert answer.headers["X-Request-Id"] == "r-1"
    assert 0 < answer.ttft_s <= answer.latency_s


@pytest.mark.parametrize(("path", "status", "body"), [
    ("/busy", 503, b"busy"),
    ("/redirect", 302, None),  # not followed
])
async def test_exchange_bytes_gives_any_status_as_received(
    server: Server, transport: NodeTransport, path: str, status: int, body: bytes | None
) -> None:
    answer = await transport.exchange_bytes("GET", server.url + path, None,
                                            aiohttp.ClientTimeout(total=5.0))
    assert answer.status == status
    if body is not None:
        assert answer.body == body


async def test_exchange_bytes_never_inflates_a_compressed_body(
    server: Server, transport: NodeTransport
) -> None:
    answer = await transport.exchange_bytes("GET", server.url + "/gzip", None,
                                            aiohttp.ClientTimeout(total=5.0))
    assert answer.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(answer.body)) == {"inflated": True}


async def test_exchange_bytes_keeps_the_size_cap(server: Server, transport: NodeTransport
                                                 ) -> None:
    with pytest.raises(MalformedAnswer, match=f"exceeded {CAP} bytes") as caught:
        await transport.exchange_bytes("GET", server.url + "/big", None,
                                       aiohttp.ClientTimeout(total=5.0))
    assert caught.value.status == 200
