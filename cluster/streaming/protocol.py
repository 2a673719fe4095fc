"""Wire format of the streaming app: headers, the receipt SSE event, JSON bodies.

The only module of the streaming app (and of its validator-side client) that spells header
names and JSON fields. Answers are the upstream's bytes untouched; the receipt travels
beside them:

- non-streaming: the ``X-Testbench-Receipt`` response header (compact JSON);
- streaming (``"stream": true``): one last SSE event after the upstream's ``[DONE]``,
  ``event: receipt`` / ``data: {...}``. OpenAI clients stop reading at ``[DONE]``, so
  they are not disturbed by it; its ``output_sha256`` covers every byte before it.

A **seeded sampled** request (temperature > 0 and a ``seed``) is forwarded with
``return_token_ids`` on, so the answer carries its token ids (vLLM's field ``token_ids``
per choice; a stream's chunks carry the new ids of each delta), and its receipt commits to
the seed and those ids (version 2, ``cluster/auth/receipts.py``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.auth.receipts import ID_PATTERN, Receipt
from cluster.wire.openai import RETURN_TOKEN_IDS, TOKEN_IDS

HEADER_RECEIPT = "x-testbench-receipt"
HEADER_REQUEST_ID = "x-testbench-request-id"
RECEIPT_EVENT_PREFIX = b"event: receipt\ndata: "
SSE_CONTENT_TYPE = "text/event-stream"
COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS)

_REQUEST_ID = re.compile(ID_PATTERN)


def valid_request_id(value: str) -> bool:
    return bool(_REQUEST_ID.fullmatch(value))


class RequestHead(BaseModel):
    """The fields of an OpenAI request the wrapper and the validator look at."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    stream: bool = False
    temperature: float | None = None
    seed: int | None = None
    n: int | None = None

    @property
    def seeded_sampling(self) -> bool:
        """Sampled (temperature > 0) with a seed: the answer is replayable and committed."""
        return self.seed is not None and self.temperature is not None and self.temperature > 0


class JobInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    node_key: str = Field(description="the key receipts are signed with (ed25519, hex)")
    endpoints: list[str]
    models: list[str]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int | str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, kind: str, code: int | str, param: str | None = None) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorDetail(message=message, type=kind, code=code, param=param)).model_dump()


def receipt_event(receipt: Receipt) -> bytes:
    return RECEIPT_EVENT_PREFIX + receipt.to_wire().encode("ascii") + b"\n\n"


def split_receipt_event(stream: bytes) -> tuple[bytes, bytes | None]:
    """(the answer's bytes, the receipt's JSON) of a streamed answer; the receipt is the
    last receipt event, and must end the stream (else None: no receipt)."""
    at = stream.rfind(RECEIPT_EVENT_PREFIX)
    if at < 0 or (at > 0 and not stream[:at].endswith(b"\n\n")):
        return stream, None
    tail = stream[at + len(RECEIPT_EVENT_PREFIX):]
    if not tail.endswith(b"\n\n") or b"\n" in tail[:-2]:
        return stream, None
    return stream[:at], tail[:-2]


def sse_payloads(stream: bytes) -> list[Any]:
    """The JSON payloads of a stream's ``data:`` lines (``[DONE]`` left out)."""
    out = []
    for line in stream.decode("utf-8").splitlines():
        if line.startswith("data:"):
            data = line[len("data:"):].strip()
            if data and data != "[DONE]":
                out.append(json.loads(data))
    return out


def answer_token_ids(output: bytes, streamed: bool) -> list[list[int]] | None:
    """The token ids of an answer, one list per choice in choice order (a stream's deltas
    joined), or None when the answer carries none (or is not an OpenAI answer)."""
    try:
        bodies = sse_payloads(output) if streamed else [json.loads(output)]
        ids: dict[int, list[int]] = {}
        seen = False
        for body in bodies:
            for choice in body["choices"]:
                index = int(choice.get("index", 0))
                found = choice.get(TOKEN_IDS)
                ids.setdefault(index, [])
                if found is None:
                    continue
                if not isinstance(found, list) or not all(
                        isinstance(t, int) and not isinstance(t, bool) for t in found):
                    return None
                seen = True
                ids[index].extend(found)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return [ids[i] for i in sorted(ids)] if seen else None


def asking_token_ids(body: bytes) -> bytes:
    """A request body with ``return_token_ids`` on (the body unchanged when it already is)."""
    payload = json.loads(body)
    if payload.get(RETURN_TOKEN_IDS) is True:
        return body
    return json.dumps({**payload, RETURN_TOKEN_IDS: True}, separators=(",", ":")).encode("utf-8")
