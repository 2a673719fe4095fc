"""Wire format of the streaming app: headers, the receipt SSE event, JSON bodies.

The only module of the streaming app (and of its validator-side client) that spells header
names and JSON fields. Answers are the upstream's bytes untouched; the receipt travels
beside them:

- non-streaming: the ``X-Testbench-Receipt`` response header (compact JSON);
- streaming (``"stream": true``): one last SSE event after the upstream's ``[DONE]``,
  ``event: receipt`` / ``data: {...}``. OpenAI clients stop reading at ``[DONE]``, so
  they are not disturbed by it; its ``output_sha256`` covers every byte before it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.auth.receipts import ID_PATTERN, Receipt

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
