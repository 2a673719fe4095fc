"""Signed messages between the MLNodes of a training run (the DiLoCo outer sync).

A message is an HTTP body of raw bytes (a safetensors pseudo-gradient) and four headers:
the run id, the outer step, the sender's ed25519 public key and its signature over::

    testbench-train-sync-v1\\n RUN_ID\\n OUTER_STEP\\n SENDER\\n SHA256(BODY)

The receiver (:class:`SyncMessageVerifier`) checks, before it parses a byte of the body:
headers well formed (400 ``malformed``), body within the size bound (413 ``too_large``),
the sender registered for this run (401 ``unknown_sender``), the signature (403
``bad_signature``), the run id (403 ``wrong_run``: a message of another run, even one
signed by a registered key). The inbox then refuses a second message from the same sender
for the same outer step, or one for a step already behind it (409 ``replayed``), and a
node that is not training answers 503 ``not_training`` (the sender retries). Each refusal
travels back as JSON ``{"detail", "reason"}``; :func:`refusal_from_answer` rebuilds it as
the :class:`SyncRefused` the sender raises.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from cluster.auth.keys import Ed25519Key, verify_signature
from cluster.core.errors import TestbenchError

SYNC_DOMAIN = b"testbench-train-sync-v1"
HEADER_RUN = "x-testbench-train-run"
HEADER_STEP = "x-testbench-train-step"
HEADER_SENDER = "x-testbench-train-sender"
HEADER_SIGNATURE = "x-testbench-train-signature"
SYNC_HEADERS = (HEADER_RUN, HEADER_STEP, HEADER_SENDER, HEADER_SIGNATURE)

_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_STEP = re.compile(r"^(0|[1-9][0-9]{0,8})$")
_KEY = re.compile(r"^[0-9a-f]{64}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")


class SyncProblem(StrEnum):
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UNKNOWN_SENDER = "unknown_sender"
    BAD_SIGNATURE = "bad_signature"
    WRONG_RUN = "wrong_run"
    REPLAYED = "replayed"
    NOT_TRAINING = "not_training"


SYNC_STATUS = {
    SyncProblem.MALFORMED: 400,
    SyncProblem.TOO_LARGE: 413,
    SyncProblem.UNKNOWN_SENDER: 401,
    SyncProblem.BAD_SIGNATURE: 403,
    SyncProblem.WRONG_RUN: 403,
    SyncProblem.REPLAYED: 409,
    SyncProblem.NOT_TRAINING: 503,
}


class SyncRefused(TestbenchError):
    """A sync message was refused; ``status`` is the HTTP answer the sender gets."""

    def __init__(self, problem: SyncProblem, detail: str) -> None:
        super().__init__(f"{problem.value}: {detail}")
        self.problem = problem
        self.detail = detail
        self.status = SYNC_STATUS[problem]

    def body(self) -> dict[str, str]:
        return {"detail": self.detail, "reason": self.problem.value}


@dataclass(frozen=True)
class SyncEnvelope:
    """A message's signed fields (the body is not part of it: only its digest)."""

    run_id: str
    outer_step: int
    sender: str
    signature: str
    payload_sha256: str


def signing_bytes(run_id: str, outer_step: int, sender: str, payload_sha256: str) -> bytes:
    parts = [run_id, str(outer_step), sender, payload_sha256]
    return b"\n".join([SYNC_DOMAIN, *(p.encode("ascii") for p in parts)])


def sign_sync_message(key: Ed25519Key, run_id: str, outer_step: int, body: bytes) -> dict[str, str]:
    """The headers of a message carrying ``body``, signed with ``key``."""
    digest = hashlib.sha256(body).hexdigest()
    return {
        HEADER_RUN: run_id,
        HEADER_STEP: str(outer_step),
        HEADER_SENDER: key.public_key,
        HEADER_SIGNATURE: key.sign(signing_bytes(run_id, outer_step, key.public_key, digest)),
    }


def read_envelope(headers: Mapping[str, str], body: bytes) -> SyncEnvelope:
    """The signed fields of a message (``headers`` keyed by lowercase names); checks only
    their format. Raises ``SyncRefused(MALFORMED)``."""
    values = [headers.get(h) for h in SYNC_HEADERS]
    missing = [h for h, v in zip(SYNC_HEADERS, values, strict=True) if v is None]
    if missing:
        raise SyncRefused(SyncProblem.MALFORMED, f"missing {', '.join(missing)}")
    run_id, step, sender, signature = (str(v) for v in values)
    for name, value, pattern in ((HEADER_RUN, run_id, _RUN), (HEADER_STEP, step, _STEP),
                                 (HEADER_SENDER, sender, _KEY),
                                 (HEADER_SIGNATURE, signature, _SIGNATURE)):
        if not pattern.fullmatch(value):
            raise SyncRefused(SyncProblem.MALFORMED, f"{name} is malformed")
    return SyncEnvelope(run_id=run_id, outer_step=int(step), sender=sender,
                        signature=signature, payload_sha256=hashlib.sha256(body).hexdigest())


class SyncMessageVerifier:
    """The receiving node's checks for one training run: who may send, and what."""

    def __init__(self, run_id: str, registered: Iterable[str], max_body_bytes: int) -> None:
        self.run_id = run_id
        self._registered = frozenset(registered)
        self._max_body_bytes = max_body_bytes

    @property
    def registered(self) -> frozenset[str]:
        return self._registered

    def verify(self, headers: Mapping[str, str], body: bytes) -> SyncEnvelope:
        """The message's envelope when the sender, the signature and the run check out;
        raises :class:`SyncRefused`. The body is hashed, never parsed."""
        if len(body) > self._max_body_bytes:
            raise SyncRefused(SyncProblem.TOO_LARGE,
                              f"the body is {len(body)} bytes, over {self._max_body_bytes}")
        env = read_envelope(headers, body)
        if env.sender not in self._registered:
            raise SyncRefused(SyncProblem.UNKNOWN_SENDER,
                              f"key {env.sender[:16]}... is not registered for training run "
                              f"{self.run_id!r} on this node")
        message = signing_bytes(env.run_id, env.outer_step, env.sender, env.payload_sha256)
        if not verify_signature(env.sender, message, env.signature):
            raise SyncRefused(SyncProblem.BAD_SIGNATURE,
                              "the signature does not verify with the sender's key over the "
                              "run id, outer step, sender and sha256 of the body")
        if env.run_id != self.run_id:
            raise SyncRefused(SyncProblem.WRONG_RUN,
                              f"message of training run {env.run_id!r}; this node trains "
                              f"{self.run_id!r}")
        return env


def refusal_from_answer(status: int, body: bytes) -> SyncRefused:
    """The :class:`SyncRefused` a node's non-2xx answer stands for (the sender's view)."""
    try:
        data = json.loads(body)
        problem = SyncProblem(data["reason"])
        detail = str(data.get("detail", ""))
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode("utf-8", errors="replace")
        # no answer of a node's sync route (its app not up yet, a proxy error): try again
        problem = SyncProblem.NOT_TRAINING if status == 404 or status >= 500 \
            else SyncProblem.MALFORMED
        detail = f"HTTP {status}: {text}"
    return SyncRefused(problem, detail)
