"""Signed receipts of streaming jobs, and their verification.

A node serving a job signs, for every answer, a receipt: the job id, the request id, the
endpoint, its public key, when it started and finished (ms since the epoch), and the
sha256 of the request body it received and of the exact bytes it sent back. The signature
is ed25519 over a canonical encoding: a domain tag, then the other fields as sorted-key,
compact, ASCII JSON (the convention of ComputeHorde's receipts). Timestamps are
integers so that the encoding has one spelling in every language.

A validator accepts a receipt only when every check passes, in this order: the job and
the node key are the ones assigned, the signature verifies, the request id and endpoint
are the ones the client used, the hashes match the bytes the client actually sent and got,
``from <= to``, both lie within the clock-skew bound of the client's own send and receive
times, and the receipt was never accepted before (a :class:`ReplayGuard`, persistent in
MongoDB's ``receipts`` collection). The replay record is written last, so a receipt that
fails any other check does not burn its request id.

A sampled answer can carry a **token commitment** (receipt version 2): the request's
``seed`` and ``token_ids_sha256``, the sha256 of the answer's token ids per choice
(:func:`token_ids_digest`; the ids travel in the answer itself, vLLM's
``return_token_ids``). Seeded sampling makes those ids replayable
(``cluster/honesty/seeded_sampling.py``): the validator checks that the ids it got are the
ones committed to and that the seed is the one it sent, then replays them on the trusted
reference. Version-1 receipts (no commitment) keep their exact signed encoding.

What receipts cannot prove: that the node ran the model it claims (a signed answer from a
cheaper model is still correctly signed; re-running samples on a reference catches that,
see :mod:`cluster.honesty.receipt_audit`), nor that its clock is right to better than the skew bound.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.auth.keys import PUBLIC_KEY_PATTERN, SIGNATURE_PATTERN, Ed25519Key, verify_signature
from cluster.core.errors import ErrorCode, TestbenchError
from cluster.core.streaming import ID_PATTERN

RECEIPT_DOMAIN = b"testbench-receipt-v1\n"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_ms(ts: float) -> int:
    return int(math.floor(ts * 1000.0))


def token_ids_digest(token_ids: Sequence[Sequence[int]]) -> str:
    """sha256 of an answer's token ids, one list per choice in choice order, as compact
    JSON (``[[1,2],[3]]``): what a version-2 receipt commits to."""
    body = json.dumps([[int(t) for t in choice] for choice in token_ids], separators=(",", ":"))
    return sha256_hex(body.encode("ascii"))


class ReceiptProblem(StrEnum):
    """Why a receipt was refused (stored as a verdict's reason)."""

    MALFORMED = "malformed"
    MISSING = "missing"
    WRONG_JOB = "wrong_job"
    WRONG_KEY = "wrong_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_REQUEST = "wrong_request"
    WRONG_ENDPOINT = "wrong_endpoint"
    INPUT_MISMATCH = "input_mismatch"
    OUTPUT_MISMATCH = "output_mismatch"
    TIME_ORDER = "time_order"
    CLOCK_SKEW = "clock_skew"
    REPLAYED = "replayed"
    TOKEN_IDS_MISMATCH = "token_ids_mismatch"
    SEED_MISMATCH = "seed_mismatch"


class ReceiptRejected(TestbenchError):
    """A receipt failed verification; ``problem`` says which check."""

    code = ErrorCode.NODE

    def __init__(self, problem: ReceiptProblem, detail: str) -> None:
        super().__init__(f"receipt refused ({problem.value}): {detail}")
        self.problem = problem
        self.detail = detail


class Receipt(BaseModel):
    """One answer's receipt, as the node signed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1, 2] = 1
    job_id: str = Field(pattern=ID_PATTERN)
    request_id: str = Field(pattern=ID_PATTERN)
    endpoint: str = Field(min_length=1, max_length=200)
    node_key: str = Field(pattern=PUBLIC_KEY_PATTERN, description="the signer's public key, hex")
    ts_from_ms: int = Field(ge=0, description="request received, ms since the epoch")
    ts_to_ms: int = Field(ge=0, description="last output byte produced, ms since the epoch")
    input_sha256: str = Field(pattern=SHA256_PATTERN)
    output_sha256: str = Field(pattern=SHA256_PATTERN)
    seed: int | None = Field(default=None, description="version 2: the sampling seed")
    token_ids_sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN,
        description="version 2: token_ids_digest of the answer's token ids")
    signature: str = Field(pattern=SIGNATURE_PATTERN)

    @model_validator(mode="after")
    def _commitment_is_version_2(self) -> Receipt:
        committed = self.seed is not None and self.token_ids_sha256 is not None
        if committed != (self.version == 2) or (self.seed is None) != (self.token_ids_sha256 is None):
            raise ValueError("a version-2 receipt has both seed and token_ids_sha256, "
                             "a version-1 receipt neither")
        return self

    def signed_fields(self) -> dict[str, Any]:
        # exclude_none keeps a version-1 receipt's encoding as it always was
        return self.model_dump(mode="json", exclude={"signature"}, exclude_none=True)

    def canonical_bytes(self) -> bytes:
        return canonical_encoding(self.signed_fields())

    @property
    def replay_key(self) -> str:
        """One receipt per (job, request): a second one for the same request is a replay."""
        return f"{self.job_id}|{self.request_id}"

    @property
    def digest(self) -> str:
        """Identifies this exact receipt (signature included)."""
        return sha256_hex(self.canonical_bytes() + bytes.fromhex(self.signature))

    def to_wire(self) -> str:
        """Compact JSON (ASCII: it travels in an HTTP header and an SSE event)."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True,
                          separators=(",", ":"))

    @classmethod
    def from_wire(cls, text: str | bytes) -> Receipt:
        """Parse a receipt; ``ReceiptRejected(MALFORMED)`` when it is not one."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "receipt"
            raise ReceiptRejected(ReceiptProblem.MALFORMED, f"{where}: {first.get('msg')}") from exc


def canonical_encoding(fields: Mapping[str, Any]) -> bytes:
    body = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return RECEIPT_DOMAIN + body.encode("ascii")


class ReceiptSigner:
    """The node side: signs a receipt for each answer of one job with the node's key."""

    def __init__(self, key: Ed25519Key, job_id: str) -> None:
        self._key = key
        self.job_id = job_id

    @property
    def node_key(self) -> str:
        return self._key.public_key

    def sign(
        self,
        *,
        request_id: str,
        endpoint: str,
        input_bytes: bytes,
        output_bytes: bytes,
        started_at: float,
        finished_at: float,
        commitment: TokenCommitment | None = None,
    ) -> Receipt:
        return self.sign_digests(
            request_id=request_id, endpoint=endpoint, input_sha256=sha256_hex(input_bytes),
            output_sha256=sha256_hex(output_bytes), started_at=started_at,
            finished_at=finished_at, commitment=commitment)

    def sign_digests(
        self,
        *,
        request_id: str,
        endpoint: str,
        input_sha256: str,
        output_sha256: str,
        started_at: float,
        finished_at: float,
        commitment: TokenCommitment | None = None,
    ) -> Receipt:
        """:meth:`sign` with the hashes already computed (a stream is hashed as it passes);
        a ``commitment`` makes it a version-2 receipt."""
        fields: dict[str, Any] = {
            "version": 1,
            "job_id": self.job_id,
            "request_id": request_id,
            "endpoint": endpoint,
            "node_key": self._key.public_key,
            "ts_from_ms": to_ms(started_at),
            "ts_to_ms": to_ms(finished_at),
            "input_sha256": input_sha256,
            "output_sha256": output_sha256,
        }
        if commitment is not None:
            fields.update(version=2, seed=commitment.seed,
                          token_ids_sha256=token_ids_digest(commitment.token_ids))
        return Receipt(**fields, signature=self._key.sign(canonical_encoding(fields)))


class TokenCommitment(BaseModel):
    """A sampled answer's seed and token ids (one list per choice)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int
    token_ids: list[list[int]]


class JobAssignment(BaseModel):
    """Which node (and which of its keys) a job was given to: what receipts must match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=ID_PATTERN)
    node_id: str = Field(min_length=1)
    node_key: str = Field(pattern=PUBLIC_KEY_PATTERN, description="the node's registered key")


class ReplayGuard(Protocol):
    """Remembers accepted receipts. ``claim`` records ``replay_key`` the first time and
    returns None; afterwards it returns the digest recorded under that key."""

    async def claim(
        self, replay_key: str, digest: str, fields: Mapping[str, Any]
    ) -> str | None: ...


class MemoryReplayGuard:
    """In-process replay memory (unit tests, a single short-lived validator)."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    async def claim(self, replay_key: str, digest: str, fields: Mapping[str, Any]) -> str | None:
        previous = self._seen.get(replay_key)
        if previous is None:
            self._seen[replay_key] = digest
        return previous


class ReceiptVerifier:
    """The validator side: every check of the module docstring, then the replay record."""

    def __init__(
        self,
        replay_guard: ReplayGuard,
        max_clock_skew_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not max_clock_skew_s >= 0:
            raise ValueError("max_clock_skew_s must be >= 0")
        self._guard = replay_guard
        self._skew_ms = int(math.ceil(max_clock_skew_s * 1000.0))
        self._clock = clock

    def check(
        self,
        receipt: Receipt,
        assignment: JobAssignment,
        *,
        input_bytes: bytes,
        output_bytes: bytes,
        request_id: str | None = None,
        endpoint: str | None = None,
        sent_at: float | None = None,
        received_at: float | None = None,
        commitment: TokenCommitment | None = None,
    ) -> None:
        """Every check but replay; raises :class:`ReceiptRejected`.

        ``received_at`` is when the client got the answer (default: now, for a client that
        verifies on receipt); ``sent_at``, when it sent the request, if it knows.
        ``commitment``: the seed the client sent and the token ids its answer carries; a
        version-2 receipt must commit to exactly those.
        """
        if receipt.job_id != assignment.job_id:
            raise ReceiptRejected(ReceiptProblem.WRONG_JOB,
                         f"receipt is for job {receipt.job_id!r}, expected {assignment.job_id!r}")
        if receipt.node_key != assignment.node_key:
            raise ReceiptRejected(ReceiptProblem.WRONG_KEY,
                         f"signed by key {receipt.node_key[:16]}..., job {assignment.job_id!r} "
                         f"is assigned to node {assignment.node_id!r} "
                         f"(key {assignment.node_key[:16]}...)")
        if not verify_signature(receipt.node_key, receipt.canonical_bytes(), receipt.signature):
            raise ReceiptRejected(ReceiptProblem.BAD_SIGNATURE,
                         "the signature does not verify with the node's key")
        if request_id is not None and receipt.request_id != request_id:
            raise ReceiptRejected(ReceiptProblem.WRONG_REQUEST,
                         f"receipt is for request {receipt.request_id!r}, not {request_id!r}")
        if endpoint is not None and receipt.endpoint != endpoint:
            raise ReceiptRejected(ReceiptProblem.WRONG_ENDPOINT,
                         f"receipt is for {receipt.endpoint!r}, the request went to {endpoint!r}")
        if receipt.input_sha256 != sha256_hex(input_bytes):
            raise ReceiptRejected(ReceiptProblem.INPUT_MISMATCH,
                         "sha256 of the request sent differs from the receipt's input_sha256")
        if receipt.output_sha256 != sha256_hex(output_bytes):
            raise ReceiptRejected(ReceiptProblem.OUTPUT_MISMATCH,
                         "sha256 of the answer received differs from the receipt's output_sha256")
        if receipt.version == 2:
            if commitment is None:
                raise ReceiptRejected(ReceiptProblem.TOKEN_IDS_MISMATCH,
                                      "the receipt commits to token ids the answer does not carry")
            if receipt.seed != commitment.seed:
                raise ReceiptRejected(ReceiptProblem.SEED_MISMATCH,
                                      f"the receipt commits to seed {receipt.seed}, the request "
                                      f"sent {commitment.seed}")
            if receipt.token_ids_sha256 != token_ids_digest(commitment.token_ids):
                raise ReceiptRejected(ReceiptProblem.TOKEN_IDS_MISMATCH,
                                      "the answer's token ids differ from the ones the receipt "
                                      "commits to")
        if receipt.ts_to_ms < receipt.ts_from_ms:
            raise ReceiptRejected(ReceiptProblem.TIME_ORDER,
                         f"ts_to_ms {receipt.ts_to_ms} is before ts_from_ms {receipt.ts_from_ms}")
        received_ms = to_ms(self._clock() if received_at is None else received_at)
        # The node cannot have finished after the client received the answer, nor long before.
        if abs(receipt.ts_to_ms - received_ms) > self._skew_ms:
            raise ReceiptRejected(ReceiptProblem.CLOCK_SKEW,
                         f"ts_to_ms {receipt.ts_to_ms} is {receipt.ts_to_ms - received_ms} ms from "
                         f"the receive time {received_ms} (bound {self._skew_ms} ms)")
        if sent_at is not None:
            sent_ms = to_ms(sent_at)
            if receipt.ts_from_ms < sent_ms - self._skew_ms:
                raise ReceiptRejected(ReceiptProblem.CLOCK_SKEW,
                             f"ts_from_ms {receipt.ts_from_ms} is before the request was sent "
                             f"({sent_ms}) by more than {self._skew_ms} ms")
            if receipt.ts_from_ms > received_ms + self._skew_ms:
                raise ReceiptRejected(ReceiptProblem.CLOCK_SKEW,
                             f"ts_from_ms {receipt.ts_from_ms} is after the answer arrived")

    async def verify(
        self,
        receipt: Receipt,
        assignment: JobAssignment,
        *,
        input_bytes: bytes,
        output_bytes: bytes,
        request_id: str | None = None,
        endpoint: str | None = None,
        sent_at: float | None = None,
        received_at: float | None = None,
        commitment: TokenCommitment | None = None,
    ) -> Receipt:
        """:meth:`check`, then claim the receipt once; returns it when it is accepted."""
        self.check(receipt, assignment, input_bytes=input_bytes, output_bytes=output_bytes,
                   request_id=request_id, endpoint=endpoint, sent_at=sent_at,
                   received_at=received_at, commitment=commitment)
        fields = {**receipt.model_dump(mode="json"), "node_id": assignment.node_id}
        previous = await self._guard.claim(receipt.replay_key, receipt.digest, fields)
        if previous is not None:
            same = "the same receipt" if previous == receipt.digest else "another receipt"
            raise ReceiptRejected(ReceiptProblem.REPLAYED,
                                  f"{same} was already accepted for job {receipt.job_id!r} "
                                  f"request {receipt.request_id!r}")
        return receipt
