"""The streaming app's logic: forward an OpenAI request to the node's model app, sign a receipt.

The answer's bytes are passed on untouched (the receipt's ``output_sha256`` covers exactly
what the client receives); a stream is hashed chunk by chunk as it passes and its receipt
is sent after the last upstream byte. Only successful answers (HTTP 200) get a receipt:
an error is not work the node can claim.

A seeded sampled request (temperature > 0 and a ``seed``) goes upstream with
``return_token_ids`` on; when the answer carries its token ids the receipt commits to them
and to the seed (version 2, ``cluster/auth/receipts.py``), so the validator can replay the
answer (``cluster/honesty/seeded_sampling.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from pydantic import ValidationError

from cluster.auth.keys import Ed25519Key
from cluster.auth.receipts import ReceiptSigner, TokenCommitment, sha256_hex
from cluster.streaming import protocol as wire
from serve_apps.streaming.config import StreamingJobConfig

log = logging.getLogger(__name__)


class JobRequestError(Exception):
    """A request the wrapper refuses or cannot forward; rendered as an OpenAI error."""

    def __init__(self, status: int, message: str, kind: str, code: str,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param


@dataclass
class ForwardedAnswer:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ForwardedStream:
    content_type: str
    chunks: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


def _commitment(seed: int | None, answer: bytes, *, streamed: bool) -> TokenCommitment | None:
    """What a seeded answer's receipt commits to (None: not seeded, or no token ids)."""
    if seed is None:
        return None
    token_ids = wire.answer_token_ids(answer, streamed)
    return None if token_ids is None else TokenCommitment(seed=seed, token_ids=token_ids)


class StreamingServing:
    """One job's forwarding and receipt signing. The HTTP session is created on first use,
    inside the serving event loop (a Serve replica's constructor runs outside it)."""

    def __init__(
        self,
        config: StreamingJobConfig,
        key: Ed25519Key,
        clock: Callable[[], float] = time.time,
        new_request_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._config = config
        self._signer = ReceiptSigner(key, config.job_id)
        self._clock = clock
        self._new_request_id = new_request_id
        self._http: aiohttp.ClientSession | None = None

    @property
    def node_key(self) -> str:
        return self._signer.node_key

    def info(self) -> wire.JobInfo:
        return wire.JobInfo(job_id=self._config.job_id, node_key=self.node_key,
                            endpoints=list(wire.ENDPOINTS), models=list(self._config.models))

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            cfg = self._config
            timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s,
                                            sock_connect=cfg.connect_timeout_s)
            self._http = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._http

    async def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def _request_id(self, given: str | None) -> str:
        if given is None:
            return self._new_request_id()
        if not wire.valid_request_id(given):
            raise JobRequestError(400, f"{wire.HEADER_REQUEST_ID} must match "
                                  f"[A-Za-z0-9._:@/+=-]{{1,200}}", "invalid_request_error",
                                  "invalid_request_id")
        return given

    def _head(self, body: bytes) -> wire.RequestHead:
        if len(body) > self._config.max_body_bytes:
            raise JobRequestError(413, f"request body over {self._config.max_body_bytes} bytes",
                                  "invalid_request_error", "body_too_large")
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
            head = wire.RequestHead.model_validate(payload)
        except (ValueError, ValidationError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise JobRequestError(400, message, "invalid_request_error", "invalid_body") from exc
        models = self._config.models
        if models and head.model not in models:
            raise JobRequestError(404, f"model {head.model!r} is not served by job "
                                  f"{self._config.job_id!r} (serves {models})",
                                  "invalid_request_error", "model_not_found", "model")
        return head

    async def forward(
        self, endpoint: str, body: bytes, request_id: str | None
    ) -> ForwardedAnswer | ForwardedStream:
        """Send ``body`` to the upstream's ``endpoint`` and sign what comes back."""
        started = self._clock()
        rid = self._request_id(request_id)
        head = self._head(body)
        url = self._config.upstream + endpoint
        seed = head.seed if head.seeded_sampling else None
        upstream_body = body if seed is None else wire.asking_token_ids(body)
        try:
            resp = await self._session().post(
                url, data=upstream_body, headers={"Content-Type": "application/json"})
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("jobs.upstream_failed job=%s url=%s error=%s", self._config.job_id, url, exc)
            raise JobRequestError(502, f"the model app did not answer: {type(exc).__name__}",
                                  "server_error", "upstream_unavailable") from exc
        content_type = resp.headers.get("Content-Type", "application/json")
        headers = {wire.HEADER_REQUEST_ID: rid}
        if head.stream and resp.status == 200 and content_type.startswith(wire.SSE_CONTENT_TYPE):
            chunks = self._stream(resp, endpoint, rid, sha256_hex(body), started, seed)
            return ForwardedStream(content_type=content_type, chunks=chunks, headers=headers)
        try:
            answer = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JobRequestError(502, f"the model app's answer broke off: {type(exc).__name__}",
                                  "server_error", "upstream_broken") from exc
        finally:
            resp.release()
        if resp.status == 200:
            receipt = self._signer.sign(request_id=rid, endpoint=endpoint, input_bytes=body,
                                        output_bytes=answer, started_at=started,
                                        finished_at=self._clock(),
                                        commitment=_commitment(seed, answer, streamed=False))
            headers[wire.HEADER_RECEIPT] = receipt.to_wire()
        return ForwardedAnswer(status=resp.status, content_type=content_type, body=answer,
                               headers=headers)

    async def _stream(
        self, resp: aiohttp.ClientResponse, endpoint: str, rid: str, input_sha256: str,
        started: float, seed: int | None,
    ) -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        kept = bytearray()  # a seeded stream's bytes, for the token ids it carries
        try:
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
                if seed is not None:
                    kept.extend(chunk)
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The client sees the stream end without a receipt: nothing to claim.
            log.warning("jobs.stream_broken job=%s request=%s error=%s",
                        self._config.job_id, rid, exc)
            return
        finally:
            resp.release()
        receipt = self._signer.sign_digests(
            request_id=rid, endpoint=endpoint, input_sha256=input_sha256,
            output_sha256=digest.hexdigest(), started_at=started, finished_at=self._clock(),
            commitment=_commitment(seed, bytes(kept), streamed=True))
        yield wire.receipt_event(receipt)

    async def models(self) -> ForwardedAnswer:
        """The upstream's model list, as is (no receipt: it is not work)."""
        try:
            async with self._session().get(self._config.upstream + "/v1/models") as resp:
                return ForwardedAnswer(status=resp.status, body=await resp.read(),
                                       content_type=resp.headers.get("Content-Type",
                                                                     "application/json"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JobRequestError(502, f"the model app did not answer: {type(exc).__name__}",
                                  "server_error", "upstream_unavailable") from exc
