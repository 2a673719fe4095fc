"""The one way testbench reaches an untrusted node over HTTP: a single bounded exchange.

The Requester's attempts (``cluster/nodes/requester.py``), the honesty checks
(``cluster/honesty/verification.py``, ``reference.py``) and the PoC round driver
(``cluster/poc/round.py``) all go through :meth:`NodeTransport.exchange`: one request, no
redirects (a node must not send testbench elsewhere), one timeout, the body read only up
to a size cap, and a JSON object back. The streaming-job audit
(``cluster/honesty/receipt_audit.py``) needs the exact bytes (a receipt signs them, a
server-sent-events stream is no JSON object) and judges the status itself:
:meth:`NodeTransport.exchange_bytes`, the same request under the same limits, gives the
status, headers and body bytes of any answer. Compressed bodies are never asked for nor
decompressed (``Accept-Encoding: identity``): a small compressed body could inflate past
the cap. Every caller sends the same headers, so a check looks like measuring traffic.

With an :class:`~cluster.nodes.policy.EndpointGuard` (every caller that reaches nodes has
one; who applies which allowlist: ``cluster/nodes/policy.py``) the endpoint policy is
applied to every connection: the session's connector resolves names only
through the guard, which checks every address and hands the connector exactly the checked
ones (a rebinding name never reaches its private answer), and address literals are checked
before each request. A refused endpoint is a :class:`NodeUnavailable` that is never
retried, and nothing is sent. ``quote_bodies=False`` keeps the start of an answer's body out
of error messages (the evaluation service: tenants see them), which then give the status,
content type and size only.

Failures are typed, with what was measured (status, time to the headers, to the end):

- :class:`NodeUnavailable`: no answer. The connection was refused, reset or cut, the
  timeout passed, the HTTP was malformed, or the status was not 2xx. ``retryable`` says
  whether a retry is safe: nothing was served (the connection failed before any response)
  or the node asked for one (429, 502, 503, 504, with its ``Retry-After``).
- :class:`~cluster.wire.openai.MalformedAnswer`: a 2xx answer that is no JSON object, or
  is larger than the cap (a node fault; :meth:`NodeTransport.exchange_bytes`: an answer of
  any status larger than the cap).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from cluster.core.errors import NodeError
from cluster.nodes.policy import EndpointGuard, EndpointRefusedError
from cluster.wire.openai import MalformedAnswer

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
ERROR_SNIPPET_BYTES = 2048
SMALL_ERROR_BODY_BYTES = 64 * 1024
# Answers outside the measuring loop (honesty checks, PoC pages) are small; the Requester
# passes its own cap (``RequesterSettings.response_size_cap_bytes``).
DEFAULT_SIZE_CAP_BYTES = 16 * 1024 * 1024
NODE_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "Accept-Encoding": "identity",  # compressed bodies would dodge the size cap
    "User-Agent": "testbench-requester/0.1",
}

Middleware = Callable[
    [aiohttp.ClientRequest, Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]]],
    Awaitable[aiohttp.ClientResponse],
]

try:  # orjson is faster when it is installed; json is the fallback
    import orjson

    loads_json: Callable[[bytes], Any] = orjson.loads

    def dumps_json(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - depends on the environment
    loads_json = json.loads

    def dumps_json(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class NodeUnavailable(NodeError):
    """The node gave no answer: unreachable, timed out, cut off, or an HTTP error status."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
        ttft_s: float | None = None,
        latency_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.ttft_s = ttft_s
        self.latency_s = latency_s


@dataclass(slots=True)
class NodeAnswer:
    """A 2xx answer: its status, its JSON object, seconds to the headers and to the end."""

    status: int
    body: dict[str, Any]
    ttft_s: float
    latency_s: float


@dataclass(slots=True)
class NodeBytes:
    """An answer of any status, as received: its status, headers and exact body bytes,
    seconds to the headers and to the end."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    ttft_s: float
    latency_s: float


def snippet(data: bytes, limit: int = 200) -> str:
    """The start of a body, whitespace collapsed, for an error message."""
    text = data[:limit].decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text + ("…" if len(data) > limit else "")


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (the HTTP-date form is ignored: the backoff applies)."""
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def open_node_session(
    max_connections: int = 100,
    middlewares: Sequence[Middleware] = (),
    guard: EndpointGuard | None = None,
) -> aiohttp.ClientSession:
    """A session for untrusted nodes: the node headers, no decompression, no cookies.

    ``max_connections`` bounds the pool (no per-host limit: nodes may share a host, their
    callers bound each node); ``middlewares`` sign requests for nodes with peer auth on;
    ``guard``: names resolve only through it, to checked addresses (it keeps the answers).
    """
    pinned: dict[str, Any] = {}
    if guard is not None:
        pinned = {"resolver": guard.aiohttp_resolver(), "use_dns_cache": False}
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=30,
        **pinned,
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers=NODE_HEADERS,
        auto_decompress=False,
        raise_for_status=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        middlewares=tuple(middlewares),
    )


class NodeTransport:
    """Bounded exchanges with untrusted nodes over one aiohttp session.

    A session from :func:`open_node_session` (``node_session=True``; :meth:`open` makes
    one) already carries the node headers and never decompresses; any other session (the
    honesty checks take their caller's) gets both per request instead, since its defaults
    ask for gzip. ``close_session``: :meth:`close` closes the session. ``guard``: the
    endpoint policy of the session's connector (address literals are checked here);
    ``quote_bodies``: error messages quote the start of a body (module docstring).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        size_cap: int = DEFAULT_SIZE_CAP_BYTES,
        node_session: bool = False,
        close_session: bool = False,
        guard: EndpointGuard | None = None,
        quote_bodies: bool = True,
    ) -> None:
        self.session = session
        self.size_cap = size_cap
        self.guard = guard
        self._quote = quote_bodies
        self._close_session = close_session
        # None = the session's own setting (per-request arguments of aiohttp's ``request``)
        self._headers: Mapping[str, str] | None = None if node_session else NODE_HEADERS
        self._auto_decompress: bool | None = None if node_session else False

    @classmethod
    def open(
        cls,
        *,
        size_cap: int = DEFAULT_SIZE_CAP_BYTES,
        max_connections: int = 100,
        middlewares: Sequence[Middleware] = (),
        guard: EndpointGuard | None = None,
        quote_bodies: bool = True,
    ) -> NodeTransport:
        """A transport over a session of its own (closed by :meth:`close`); with ``guard``,
        every connection it makes obeys the endpoint policy."""
        session = open_node_session(max_connections, middlewares, guard)
        return cls(session, size_cap=size_cap, node_session=True, close_session=True,
                   guard=guard, quote_bodies=quote_bodies)

    @property
    def closed(self) -> bool:
        return self.session.closed

    async def close(self) -> None:
        """Close the session if this transport opened it."""
        if self._close_session and not self.session.closed:
            await self.session.close()

    async def exchange(
        self,
        method: str,
        url: URL | str,
        data: bytes | None,
        timeout: aiohttp.ClientTimeout,
        timeout_source: str = "",
    ) -> NodeAnswer:
        """One request and its JSON object answer; raises :class:`NodeUnavailable` or
        :class:`MalformedAnswer` (see the module docstring). ``timeout_source`` says in a
        time-out's message where the limit came from (the Requester's ``SLA``)."""
        return self.parse_answer(await self.receive(method, url, data, timeout, timeout_source))

    async def receive(
        self,
        method: str,
        url: URL | str,
        data: bytes | None,
        timeout: aiohttp.ClientTimeout,
        timeout_source: str = "",
    ) -> NodeBytes:
        """:meth:`exchange` up to its 2xx answer's bytes, not yet parsed: a caller that holds
        a slot of the node's concurrency frees it before the parsing (:meth:`parse_answer`),
        which is its own CPU, not the node's time."""
        return await self._send(method, url, data, timeout, timeout_source, None,
                                any_status=False)

    def parse_answer(self, answer: NodeBytes) -> NodeAnswer:
        """A received 2xx answer as its JSON object; raises :class:`MalformedAnswer`."""
        status, body, ttft, latency = answer.status, answer.body, answer.ttft_s, answer.latency_s
        try:
            parsed = loads_json(body)
        except ValueError:
            content_type = answer.headers.get("Content-Type", "")
            raise MalformedAnswer(
                f"invalid JSON body (Content-Type {content_type or 'missing'}): "
                f"{self._quoted(body)}",
                status, ttft_s=ttft, latency_s=latency,
            ) from None
        if not isinstance(parsed, dict):
            raise MalformedAnswer(
                f"response is a JSON {type(parsed).__name__}, not an object: "
                f"{self._quoted(body)}",
                status, ttft_s=ttft, latency_s=latency,
            )
        return NodeAnswer(status, parsed, ttft, latency)

    async def exchange_bytes(
        self,
        method: str,
        url: URL | str,
        data: bytes | None,
        timeout: aiohttp.ClientTimeout,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_source: str = "",
    ) -> NodeBytes:
        """One request and its answer as received, whatever its status: the body's exact
        bytes (a whole server-sent-events stream, read to its end), under the same size
        cap, timeout and no-redirect rule as :meth:`exchange`. ``headers`` are added to the
        node headers. Raises :class:`NodeUnavailable` when no answer came (never for a
        status) and :class:`MalformedAnswer` when the body exceeds the cap."""
        return await self._send(method, url, data, timeout, timeout_source, headers,
                                any_status=True)

    async def _send(
        self,
        method: str,
        url: URL | str,
        data: bytes | None,
        timeout: aiohttp.ClientTimeout,
        timeout_source: str,
        extra_headers: Mapping[str, str] | None,
        *,
        any_status: bool,
    ) -> NodeBytes:
        """The request and its capped body; a non-2xx status raises unless ``any_status``."""
        headers = self._headers
        if extra_headers:
            headers = {**(headers or {}), **extra_headers}
        t0 = time.perf_counter()
        ttft: float | None = None
        try:
            if self.guard is not None:
                self.guard.check_literal(URL(url).raw_host if isinstance(url, str)
                                         else url.raw_host)
            async with self.session.request(
                method,
                url,
                data=data,
                timeout=timeout,
                allow_redirects=False,
                raise_for_status=False,  # a caller's session may raise: statuses are typed here
                headers=headers,
                auto_decompress=self._auto_decompress,
            ) as resp:
                ttft = time.perf_counter() - t0
                status = resp.status
                if not any_status and not 200 <= status < 300:
                    raise await _http_error(resp, status, t0, ttft, quote=self._quote)
                body = await self._read_capped(resp)
                latency = time.perf_counter() - t0
                if body is None:
                    resp.close()  # drop the connection: the rest of the body is never read
                    raise MalformedAnswer(f"response exceeded {self.size_cap} bytes", status,
                                          ttft_s=ttft, latency_s=latency)
                return NodeBytes(status, resp.headers, body, ttft, latency)
        except EndpointRefusedError as exc:
            # Nothing was sent; a retry would be refused the same way.
            raise NodeUnavailable(str(exc), latency_s=time.perf_counter() - t0) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise NodeUnavailable(
                f"connect timed out after {timeout.sock_connect or timeout.total or 0:g} s",
                retryable=True,
                latency_s=time.perf_counter() - t0,
            ) from exc
        except TimeoutError as exc:
            raise NodeUnavailable(
                f"timed out after {timeout.total or 0:.1f} s"
                + (f" ({timeout_source})" if timeout_source else "")
                + (" waiting for the response" if ttft is None else " reading the body"),
                ttft_s=ttft,
                latency_s=time.perf_counter() - t0,
            ) from exc
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            # Before any response arrived: the node never answered, a retry is correct.
            # After the headers: the body was cut, the request was served; no retry.
            where = "before the response" if ttft is None else "while reading the body"
            raise NodeUnavailable(
                f"connection error {where}: {type(exc).__name__}: {exc}",
                retryable=ttft is None,
                ttft_s=ttft,
                latency_s=time.perf_counter() - t0,
            ) from exc
        except aiohttp.ClientError as exc:  # malformed HTTP, truncated payload, ...
            raise NodeUnavailable(
                f"bad HTTP response: {type(exc).__name__}: {exc}",
                ttft_s=ttft,
                latency_s=time.perf_counter() - t0,
            ) from exc

    def _quoted(self, body: bytes) -> str:
        return snippet(body) if self._quote else f"{len(body)} bytes, not quoted"

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes | None:
        """The whole body, or None as soon as it exceeds the size cap."""
        cap = self.size_cap
        length = resp.content_length
        if length is not None:
            if length > cap:
                return None
            return await resp.read()  # the parser stops at Content-Length
        buf = bytearray()
        async for chunk in resp.content.iter_any():
            buf += chunk
            if len(buf) > cap:
                return None
        return bytes(buf)


async def _http_error(
    resp: aiohttp.ClientResponse, status: int, t0: float, ttft: float, quote: bool = True
) -> NodeUnavailable:
    length = resp.content_length
    if length is not None and length <= SMALL_ERROR_BODY_BYTES:
        body = await resp.read()  # read it all: the connection stays reusable
    else:
        body = await resp.content.read(ERROR_SNIPPET_BYTES)
        resp.close()
    retryable = status in RETRYABLE_STATUSES
    if body and not quote:
        kind = resp.headers.get("Content-Type", "no content type").split(";")[0]
        message = f"HTTP {status} ({kind}, body not quoted)"
    else:
        message = f"HTTP {status}: {snippet(body)}" if body else f"HTTP {status}"
    return NodeUnavailable(
        message,
        status,
        retryable=retryable,
        retry_after_s=retry_after_s(resp.headers) if retryable else None,
        ttft_s=ttft,
        latency_s=time.perf_counter() - t0,
    )


class NodeEndpoint:
    """One node's base URL (``http://host:port``, routes below it) over a transport, for
    callers that speak JSON to named routes (the honesty checks, the PoC round driver).
    Errors are the transport's, their message prefixed with the route."""

    def __init__(self, base_url: str, transport: NodeTransport, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.transport = transport
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def request_json(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> NodeAnswer:
        data = None if body is None else dumps_json(dict(body))
        try:
            return await self.transport.exchange(method, self.base_url + path, data,
                                                 self._timeout)
        except (NodeUnavailable, MalformedAnswer) as exc:
            exc.args = (f"{path}: {exc}",)  # same error, its typed fields kept
            raise

    async def post_json(self, path: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        """POST ``body``; the answer and its latency in seconds."""
        answer = await self.request_json("POST", path, body)
        return answer.body, answer.latency_s

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET a JSON object (:class:`NodeUnavailable` carries the status when not 2xx)."""
        return (await self.request_json("GET", path)).body
