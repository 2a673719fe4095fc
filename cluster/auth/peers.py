"""Peer authentication: requests signed by registered ed25519 keys.

A signed request carries four headers: the key id, a timestamp (seconds since the epoch),
a fresh nonce, and the signature over::

    testbench-peer-auth-v1\\n METHOD\\n HOST\\n PATH\\n QUERY\\n TIMESTAMP\\n NONCE\\n KEY_ID\\n
    SHA256(BODY)

(newline-separated; HOST the ``Host`` header lowercased, without a ``:80``/``:443`` port,
so a request signed for one node cannot be replayed to another; PATH percent-decoded and
with any route prefix, as the client addressed it; QUERY raw, as sent). Proxies in front
of a node must keep the ``Host`` header.
The server refuses, before the request reaches any route (so a refused request changes
nothing):

- no or malformed auth headers: 401; an unknown key id: 401;
- a timestamp more than ``max_skew_s`` from the server's clock: 401 (expired);
- a signature that does not verify: 403; a key not registered for the route's purpose: 403;
- a nonce already used by that key within the timestamp window: 403 (replayed).

The nonce is recorded only after the signature verified, so nobody can burn another
peer's nonces; it is remembered until its timestamp expires, after which the timestamp
check alone refuses the replay.

What it cannot catch: a stolen private key (rotate it in the registry), or a replay to a
*different* replica of an app whose nonces are kept in process (configure
``auth.nonce_mongo_url`` when an app has more than one replica: the app then hands the
verifier ``cluster.storage.mongo.MongoNonceStore``, see ``serve_apps/common/peer_auth.py``;
this package keeps to the :class:`NonceStore` protocol). It authenticates the
request, not the answer: answers of jobs carry receipts (:mod:`cluster.auth.receipts`).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict

from cluster.auth.keys import Ed25519Key, verify_signature
from cluster.core.errors import TestbenchError
from cluster.core.settings import AuthSettings

if TYPE_CHECKING:
    import httpx
    from aiohttp import ClientRequest, ClientResponse

log = logging.getLogger(__name__)

AUTH_DOMAIN = b"testbench-peer-auth-v1"
HEADER_KEY_ID = "x-testbench-key-id"
HEADER_TIMESTAMP = "x-testbench-timestamp"
HEADER_NONCE = "x-testbench-nonce"
HEADER_SIGNATURE = "x-testbench-signature"
AUTH_HEADERS = (HEADER_KEY_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

_KEY_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,6})?$")
_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")


class AuthProblem(StrEnum):
    UNSIGNED = "unsigned"
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED = "expired"
    BAD_SIGNATURE = "bad_signature"
    WRONG_PURPOSE = "wrong_purpose"
    REPLAYED = "replayed"
    BODY_TOO_LARGE = "body_too_large"


_STATUS = {
    AuthProblem.UNSIGNED: 401,
    AuthProblem.MALFORMED: 401,
    AuthProblem.UNKNOWN_KEY: 401,
    AuthProblem.EXPIRED: 401,
    AuthProblem.BAD_SIGNATURE: 403,
    AuthProblem.WRONG_PURPOSE: 403,
    AuthProblem.REPLAYED: 403,
    AuthProblem.BODY_TOO_LARGE: 413,
}


class AuthRefused(TestbenchError):
    """A request failed peer authentication; ``status`` is the HTTP answer."""

    def __init__(self, problem: AuthProblem, detail: str) -> None:
        super().__init__(f"{problem.value}: {detail}")
        self.problem = problem
        self.detail = detail
        self.status = _STATUS[problem]


class PeerKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str
    public_key: str
    purposes: frozenset[str]


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical_host(host: str) -> str:
    """``Host`` as signed: lowercase, default ports dropped (clients omit them or not)."""
    host = host.strip().lower()
    for default in (":80", ":443"):
        if host.endswith(default):
            return host[: -len(default)]
    return host


def canonical_request(
    method: str, host: str, path: str, query: str, timestamp: str, nonce: str, key_id: str,
    body: bytes,
) -> bytes:
    parts = [method.upper(), canonical_host(host), path, query, timestamp, nonce, key_id,
             body_sha256(body)]
    return b"\n".join([AUTH_DOMAIN, *(p.encode("utf-8") for p in parts)])


class KeyRegistry:
    """Registered peer keys by key id (from :class:`AuthSettings` ``keys``)."""

    def __init__(self, keys: Mapping[str, PeerKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> KeyRegistry:
        return cls({
            key_id: PeerKey(key_id=key_id, public_key=k.public_key, purposes=frozenset(k.purposes))
            for key_id, k in settings.keys.items()
        })

    def get(self, key_id: str) -> PeerKey | None:
        return self._keys.get(key_id)

    def __len__(self) -> int:
        return len(self._keys)


class NonceStore(Protocol):
    async def first_use(self, key_id: str, nonce: str, expires_at: float) -> bool:
        """Record (key_id, nonce) until ``expires_at``; False when it was already recorded."""
        ...


class MemoryNonceStore:
    """Nonces of one process (an app with one replica). Expired nonces are dropped as new
    ones arrive, so memory is bounded by the request rate times the timestamp window."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._seen: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, str, str]] = []

    async def first_use(self, key_id: str, nonce: str, expires_at: float) -> bool:
        now = self._clock()
        while self._expiry and self._expiry[0][0] < now:
            _, k, n = heapq.heappop(self._expiry)
            if self._seen.get((k, n), math.inf) < now:
                del self._seen[(k, n)]
        if (key_id, nonce) in self._seen:
            return False
        self._seen[(key_id, nonce)] = expires_at
        heapq.heappush(self._expiry, (expires_at, key_id, nonce))
        return True

    def __len__(self) -> int:
        return len(self._seen)


class RequestVerifier:
    """Checks a request's auth headers for one purpose ("control" or "jobs")."""

    def __init__(
        self,
        registry: KeyRegistry,
        nonces: NonceStore,
        purpose: str,
        max_skew_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._nonces = nonces
        self.purpose = purpose
        self._max_skew_s = max_skew_s
        self._clock = clock

    async def verify(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> PeerKey:
        """The peer that signed the request; raises :class:`AuthRefused`.

        ``headers`` must be keyed by lowercase names; ``host`` among them.
        """
        values = [headers.get(h) for h in AUTH_HEADERS]
        if all(v is None for v in values):
            raise AuthRefused(AuthProblem.UNSIGNED, f"sign the request ({', '.join(AUTH_HEADERS)})")
        key_id, timestamp, nonce, signature = values
        if key_id is None or timestamp is None or nonce is None or signature is None:
            missing = [h for h, v in zip(AUTH_HEADERS, values, strict=True) if v is None]
            raise AuthRefused(AuthProblem.MALFORMED, f"missing {', '.join(missing)}")
        if not _KEY_ID.fullmatch(key_id):
            raise AuthRefused(AuthProblem.MALFORMED, f"{HEADER_KEY_ID} is not a key id")
        if not _TIMESTAMP.fullmatch(timestamp):
            raise AuthRefused(AuthProblem.MALFORMED, f"{HEADER_TIMESTAMP} must be epoch seconds")
        if not _NONCE.fullmatch(nonce):
            raise AuthRefused(AuthProblem.MALFORMED, f"{HEADER_NONCE} must be 16-128 of [A-Za-z0-9_-]")
        if not _SIGNATURE.fullmatch(signature):
            raise AuthRefused(AuthProblem.MALFORMED, f"{HEADER_SIGNATURE} must be 128 hex characters")
        peer = self._registry.get(key_id)
        if peer is None:
            raise AuthRefused(AuthProblem.UNKNOWN_KEY, f"key {key_id!r} is not registered")
        ts = float(timestamp)
        now = self._clock()
        if abs(now - ts) > self._max_skew_s:
            raise AuthRefused(AuthProblem.EXPIRED, f"timestamp is {now - ts:+.1f} s from the "
                                                  f"server's clock (limit {self._max_skew_s} s)")
        host = headers.get("host", "")
        message = canonical_request(method, host, path, query, timestamp, nonce, key_id, body)
        if not verify_signature(peer.public_key, message, signature):
            raise AuthRefused(AuthProblem.BAD_SIGNATURE,
                              f"the signature does not verify with key {key_id!r}")
        if self.purpose not in peer.purposes:
            raise AuthRefused(AuthProblem.WRONG_PURPOSE,
                              f"key {key_id!r} is not registered for {self.purpose} routes")
        if not await self._nonces.first_use(key_id, nonce, ts + self._max_skew_s + 1.0):
            raise AuthRefused(AuthProblem.REPLAYED, f"nonce already used by key {key_id!r}")
        return peer


def verifier_from_settings(
    settings: AuthSettings,
    purpose: str,
    clock: Callable[[], float] = time.time,
    nonces: NonceStore | None = None,
) -> RequestVerifier:
    """The verifier an app uses. ``nonces`` is the shared store when
    ``auth.nonce_mongo_url`` is set (the caller builds it: this package opens no database);
    otherwise nonces are kept in this process."""
    if nonces is None:
        if settings.nonce_mongo_url:
            raise ValueError("auth.nonce_mongo_url is set: pass its nonce store "
                             "(cluster.storage.mongo.MongoNonceStore.from_url)")
        nonces = MemoryNonceStore(clock)
    return RequestVerifier(KeyRegistry.from_settings(settings), nonces, purpose,
                           settings.max_skew_s, clock)


class RequestSigner:
    """Signs outgoing requests with one registered key.

    - httpx (sync or async): ``httpx.Client(auth=signer.httpx_auth)``;
    - aiohttp: ``aiohttp.ClientSession(middlewares=[signer.aiohttp_middleware])``;
    - anything else: ``signer.headers(method, url, body)``.
    """

    def __init__(
        self,
        key_id: str,
        key: Ed25519Key,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        if not _KEY_ID.fullmatch(key_id):
            raise ValueError(f"invalid key id {key_id!r}")
        self.key_id = key_id
        self._key = key
        self._clock = clock
        self._nonce = nonce

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> RequestSigner | None:
        """This process's signer (``auth.signing_key_id`` / ``signing_key_file``), if any."""
        if settings.signing_key_id is None or settings.signing_key_file is None:
            return None
        return cls(settings.signing_key_id, Ed25519Key.from_file(settings.signing_key_file))

    @property
    def public_key(self) -> str:
        return self._key.public_key

    def sign(
        self, method: str, host: str, path: str, query: str, body: bytes, *,
        timestamp: float | None = None, nonce: str | None = None,
    ) -> dict[str, str]:
        """The auth headers for one request (``timestamp``/``nonce`` override: tests)."""
        ts = f"{self._clock() if timestamp is None else timestamp:.3f}"
        n = self._nonce() if nonce is None else nonce
        message = canonical_request(method, host, path, query, ts, n, self.key_id, body)
        return {HEADER_KEY_ID: self.key_id, HEADER_TIMESTAMP: ts, HEADER_NONCE: n,
                HEADER_SIGNATURE: self._key.sign(message)}

    def headers(self, method: str, url: str, body: bytes = b"", **kw: Any) -> dict[str, str]:
        """:meth:`sign` for a full URL (host, path and raw query taken from it)."""
        parts = urlsplit(url)
        return self.sign(method, parts.netloc.rpartition("@")[2], unquote(parts.path) or "/",
                         parts.query, body, **kw)

    def httpx_auth(self, request: httpx.Request) -> httpx.Request:
        """An httpx auth callable. Streaming request bodies cannot be hashed up front and
        are refused: pass ``content=`` bytes or ``json=``."""
        body = request.content  # raises httpx.RequestNotRead for a streaming body
        url = request.url
        request.headers.update(self.sign(request.method, request.headers["host"], url.path,
                                         url.query.decode("ascii"), body))
        return request

    async def aiohttp_middleware(
        self,
        request: ClientRequest,
        handler: Callable[[ClientRequest], Awaitable[ClientResponse]],
    ) -> ClientResponse:
        """An aiohttp client middleware (aiohttp >= 3.12)."""
        payload = request.body
        body = b"" if isinstance(payload, bytes | bytearray) else await payload.as_bytes()
        url = request.url
        host = request.headers.get("Host") or url.raw_authority
        signed = self.sign(request.method, host, url.path, url.raw_query_string, bytes(body))
        for name, value in signed.items():
            request.headers[name] = value
        return await handler(request)
