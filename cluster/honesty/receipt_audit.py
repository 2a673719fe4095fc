"""Streaming organic jobs, validator side: receipts, re-runs, verdicts.

A :class:`StreamingJobClient` queries a job's app (``serve_apps/streaming``) and keeps each exchange:
the exact request bytes, the exact answer bytes, the receipt and its own send/receive
times. It and :class:`OpenAIReference` reach their servers through the node transport
(:meth:`cluster.nodes.transport.NodeTransport.exchange_bytes`: size cap, timeout, no
redirects). A :class:`JobAuditor` then

1. verifies every receipt (:class:`~cluster.auth.receipts.ReceiptVerifier`: signature,
   assigned key, hashes, clock skew, replay); a refused or missing receipt is a verdict;
2. re-runs a seeded sample of the temperature-0 exchanges (``rerun_fraction``, at least
   ``rerun_min``) on the trusted reference and compares the answers' texts exactly
   (``id``/``created`` differ between servers, the text must not); a difference is a
   verdict with both texts as evidence;
3. replays every **seeded sampled** answer (temperature > 0 with a ``seed``; its receipt
   commits to the seed and the answer's token ids, version 2) on the reference, teacher-
   forced on the committed ids (``cluster/honesty/seeded_sampling.py``), and judges all of
   the audit's replayed tokens together (``replay_max_mismatch_share``; fewer than
   ``replay_min_tokens``: no judgement). A seeded answer without a commitment, or whose
   ids do not spell its text, fails (check ``replay``, one verdict per audit);
4. writes the verdicts and one summary verdict per audit (check ``streaming_job``): it
   fails when a receipt was refused, a re-run differs or the replay fails, and is
   ``unknown`` when no exchange was answered (no receipt to check): an audit of nothing
   proves nothing.

Temperature-0 answers are re-run and compared as text. Sampled answers have no single
right text: only seeded ones can be checked (by replay); a sampled answer without a seed is
not checked at all. The chance of catching a node that cheats on a share ``q`` of its
temperature-0 answers with ``k`` re-runs is ``1 - (1 - q) ** k``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
from pydantic import BaseModel, ConfigDict

from cluster.auth.receipts import (
    JobAssignment,
    Receipt,
    ReceiptProblem,
    ReceiptRejected,
    ReceiptVerifier,
    TokenCommitment,
    sha256_hex,
    to_ms,
)
from cluster.core.settings import ReceiptSettings
from cluster.core.verdicts import Check, Outcome, VerdictRecord
from cluster.honesty.seeded_sampling import ReplayJudgement, ReplayResult, judge_replay
from cluster.honesty.verdicts import VerdictSink
from cluster.nodes.policy import EndpointGuard
from cluster.nodes.transport import DEFAULT_SIZE_CAP_BYTES, NodeTransport, NodeUnavailable

# the streaming app's wire module spells the headers and the receipt event (no Ray inside)
from cluster.streaming import protocol as wire
from cluster.wire.openai import MalformedAnswer

log = logging.getLogger(__name__)

CHECK_RECEIPT = Check.RECEIPT
CHECK_RERUN = Check.RERUN
CHECK_REPLAY = Check.REPLAY
CHECK_JOB = Check.STREAMING_JOB


class AnswerFormatError(ValueError):
    """An answer that is not an OpenAI completion or chat completion (or stream of them)."""


class JobExchange(BaseModel):
    """One request to a job's app and what came back, byte for byte."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    request_id: str
    endpoint: str
    request_body: bytes
    status: int
    output: bytes  # a stream's bytes up to (not including) the receipt event
    streamed: bool
    receipt_wire: str | None
    sent_at: float
    received_at: float


def _timeout(http: aiohttp.ClientSession, timeout_s: float | None) -> aiohttp.ClientTimeout:
    """``timeout_s`` for a whole exchange; None: the session's own timeout."""
    return http.timeout if timeout_s is None else aiohttp.ClientTimeout(total=timeout_s)


class StreamingJobClient:
    """A client of one job's app that keeps every exchange for the auditor.

    ``timeout_s`` bounds one exchange, a stream read to its end included (None: the
    session's own timeout); ``size_cap`` bounds its body. ``guard``: the endpoint policy
    ``http`` was opened with (``cluster/nodes/policy.py``; address literals are checked here).
    """

    def __init__(
        self,
        base_url: str,
        job_id: str,
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        new_request_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        *,
        timeout_s: float | None = None,
        size_cap: int = DEFAULT_SIZE_CAP_BYTES,
        guard: EndpointGuard | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self.job_id = job_id
        self._transport = NodeTransport(http, size_cap=size_cap, guard=guard)
        self._timeout = _timeout(http, timeout_s)
        self._clock = clock
        self._new_request_id = new_request_id

    async def call(self, endpoint: str, body: Mapping[str, Any]) -> JobExchange:
        """POST ``body`` to ``endpoint`` and keep the answer, whatever its status. No answer
        raises :class:`NodeUnavailable`, one over the size cap :class:`MalformedAnswer`
        (both a ``NodeError``)."""
        data = json.dumps(dict(body), separators=(",", ":")).encode("utf-8")
        request_id = self._new_request_id()
        sent_at = self._clock()
        try:
            answer = await self._transport.exchange_bytes(
                "POST", self._base + endpoint, data, self._timeout,
                headers={wire.HEADER_REQUEST_ID: request_id})
        except (NodeUnavailable, MalformedAnswer) as exc:
            exc.args = (f"job {self.job_id}: {endpoint} failed: {exc}",)  # typed fields kept
            raise
        received_at = self._clock()
        raw, status = answer.body, answer.status
        content_type = answer.headers.get("Content-Type", "")
        header_receipt = answer.headers.get(wire.HEADER_RECEIPT)
        streamed = content_type.startswith(wire.SSE_CONTENT_TYPE)
        receipt_wire: str | None = header_receipt
        output = raw
        if streamed:
            output, event = wire.split_receipt_event(raw)
            receipt_wire = event.decode("utf-8", "replace") if event is not None else None
        return JobExchange(job_id=self.job_id, request_id=request_id, endpoint=endpoint,
                           request_body=data, status=status, output=output, streamed=streamed,
                           receipt_wire=receipt_wire, sent_at=sent_at, received_at=received_at)


def _choice_text(choice: Mapping[str, Any], chat: bool, streamed: bool) -> str:
    if not chat:
        text = choice.get("text")
    elif streamed:
        text = (choice.get("delta") or {}).get("content")
    else:
        text = (choice.get("message") or {}).get("content")
    if text is not None and not isinstance(text, str):
        raise AnswerFormatError("a choice's text is not a string")
    return text or ""


def answer_texts(endpoint: str, output: bytes, streamed: bool) -> list[str]:
    """The answer's text per choice (a stream's deltas joined), in choice order."""
    chat = endpoint.endswith("/chat/completions")
    try:
        if not streamed:
            bodies = [json.loads(output)]
        else:
            bodies = []
            for line in output.decode("utf-8").splitlines():
                if line.startswith("data:"):
                    data = line[len("data:"):].strip()
                    if data and data != "[DONE]":
                        bodies.append(json.loads(data))
        texts: dict[int, str] = {}
        for body in bodies:
            for choice in body["choices"]:
                index = int(choice.get("index", 0))
                texts[index] = texts.get(index, "") + _choice_text(choice, chat, streamed)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AnswerFormatError(f"not an OpenAI answer: {type(exc).__name__}: {exc}") from exc
    return [texts[i] for i in sorted(texts)]


def request_head(request_body: bytes) -> wire.RequestHead | None:
    try:
        return wire.RequestHead.model_validate_json(request_body)
    except ValueError:
        return None


def token_commitment(ex: JobExchange) -> TokenCommitment | None:
    """The seed a seeded sampled request sent and the token ids its answer carries (None:
    not seeded, or the answer carries no ids)."""
    head = request_head(ex.request_body)
    if head is None or not head.seeded_sampling or head.seed is None:
        return None
    token_ids = wire.answer_token_ids(ex.output, ex.streamed)
    return None if token_ids is None else TokenCommitment(seed=head.seed, token_ids=token_ids)


def is_temperature_zero(request_body: bytes) -> bool:
    try:
        payload = json.loads(request_body)
    except ValueError:
        return False
    temperature = payload.get("temperature") if isinstance(payload, dict) else None
    return isinstance(temperature, int | float) and not isinstance(temperature, bool) \
        and temperature == 0


class ReferenceUnavailable(Exception):
    """The reference could not answer (not the node's fault: no verdict)."""


class AnswerNotSpelled(ValueError):
    """An answer's committed token ids do not decode to its text (the node's fault)."""


class Reference(Protocol):
    async def answer(self, endpoint: str, body: dict[str, Any]) -> list[str]:
        """The reference's answer texts to ``body`` (raises :class:`ReferenceUnavailable`)."""
        ...

    async def replay(self, endpoint: str, body: dict[str, Any], token_ids: list[list[int]],
                     texts: list[str]) -> list[ReplayResult]:
        """Replay a seeded sampled answer's choices on their token ids, one result per
        choice (raises :class:`AnswerNotSpelled` when the ids do not spell ``texts``,
        :class:`ReferenceUnavailable` when it cannot replay)."""
        ...


class OpenAIReference:
    """A trusted OpenAI-compatible deployment of the claimed model (non-streaming re-runs).

    ``timeout_s`` bounds one re-run (None: the session's own timeout); ``size_cap`` its
    answer.
    """

    def __init__(
        self,
        base_url: str,
        http: aiohttp.ClientSession,
        model: str | None = None,
        *,
        timeout_s: float | None = None,
        size_cap: int = DEFAULT_SIZE_CAP_BYTES,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._transport = NodeTransport(http, size_cap=size_cap)
        self._timeout = _timeout(http, timeout_s)
        self._model = model

    async def answer(self, endpoint: str, body: dict[str, Any]) -> list[str]:
        payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        if self._model is not None:
            payload["model"] = self._model
        try:
            answer = await self._transport.exchange_bytes(
                "POST", self._base + endpoint, json.dumps(payload).encode("utf-8"), self._timeout)
        except (NodeUnavailable, MalformedAnswer) as exc:
            raise ReferenceUnavailable(f"reference unreachable: {type(exc).__name__}: {exc}") from exc
        raw = answer.body
        if answer.status != 200:
            raise ReferenceUnavailable(f"reference answered HTTP {answer.status}: {raw[:200]!r}")
        try:
            return answer_texts(endpoint, raw, streamed=False)
        except AnswerFormatError as exc:
            raise ReferenceUnavailable(str(exc)) from exc

    async def replay(self, endpoint: str, body: dict[str, Any], token_ids: list[list[int]],
                     texts: list[str]) -> list[ReplayResult]:
        raise ReferenceUnavailable("a bare OpenAI reference has no tokenizer to replay with: "
                                   "use a trusted reference (cluster/honesty/reference.py)")


class AuditReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: str
    job_id: str
    exchanges: int
    not_ok: int  # answered with an error: no receipt expected, nothing to audit
    receipts_valid: int
    receipts_refused: int
    eligible: int  # valid receipts of temperature-0 requests
    rerun: int
    mismatches: int
    reference_errors: int
    seeded: int = 0  # valid receipts of seeded sampled requests
    replayed_tokens: int = 0
    replay_mismatches: int = 0
    replay_outcome: Outcome | None = None  # None: nothing seeded to replay
    outcome: Outcome  # the summary verdict's
    verdicts: list[VerdictRecord]

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS


def _excerpt(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"...[{len(text) - limit} more]"


def _first_difference(a: Sequence[str], b: Sequence[str]) -> dict[str, int]:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            at = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                      min(len(x), len(y)))
            return {"choice": index, "char": at}
    return {"choice": min(len(a), len(b)), "char": 0}


class JobAuditor:
    """Audits one job's exchanges: receipts first, then re-runs on the reference."""

    def __init__(
        self,
        verifier: ReceiptVerifier,
        reference: Reference,
        verdicts: VerdictSink,
        settings: ReceiptSettings,
        rng: random.Random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifier = verifier
        self._reference = reference
        self._verdicts = verdicts
        self._settings = settings
        self._rng = rng
        self._clock = clock

    def sample_size(self, eligible: int) -> int:
        s = self._settings
        return min(eligible, max(s.rerun_min, math.ceil(s.rerun_fraction * eligible)))

    async def audit(self, assignment: JobAssignment, exchanges: Sequence[JobExchange]
                    ) -> AuditReport:
        now = self._clock()
        node, job = assignment.node_id, assignment.job_id
        limit = self._settings.max_evidence_chars
        verdicts: list[VerdictRecord] = []

        def verdict(check: Check, request_id: str, reason: str, evidence: dict[str, Any]
                    ) -> VerdictRecord:
            return VerdictRecord(verdict_id=f"{check}|{node}|{job}|{request_id}", node_id=node,
                                 check=check, outcome=Outcome.FAIL, reason=reason,
                                 evidence={"job_id": job, "request_id": request_id, **evidence},
                                 ts=now)

        accepted: list[JobExchange] = []
        receipts: dict[str, Receipt] = {}
        not_ok = 0
        for ex in exchanges:
            if ex.status != 200:
                not_ok += 1
                continue
            try:
                if ex.receipt_wire is None:
                    raise ReceiptRejected(ReceiptProblem.MISSING, "the answer carried no receipt")
                receipts[ex.request_id] = await self._verifier.verify(
                    Receipt.from_wire(ex.receipt_wire), assignment,
                    input_bytes=ex.request_body, output_bytes=ex.output,
                    request_id=ex.request_id, endpoint=ex.endpoint,
                    sent_at=ex.sent_at, received_at=ex.received_at,
                    commitment=token_commitment(ex))
            except ReceiptRejected as refused:
                log.warning("honesty.receipt_refused node=%s job=%s request=%s problem=%s",
                            node, job, ex.request_id, refused.problem.value)
                verdicts.append(verdict(CHECK_RECEIPT, ex.request_id, refused.problem.value, {
                    "detail": refused.detail, "endpoint": ex.endpoint,
                    "receipt": _excerpt(ex.receipt_wire or "", limit),
                    "input_sha256": sha256_hex(ex.request_body),
                    "output_sha256": sha256_hex(ex.output)}))
                continue
            accepted.append(ex)

        eligible = [ex for ex in accepted if is_temperature_zero(ex.request_body)]
        sample = self._rng.sample(eligible, self.sample_size(len(eligible)))
        mismatches = reference_errors = 0
        for ex in sample:
            body = json.loads(ex.request_body)
            try:
                node_texts = answer_texts(ex.endpoint, ex.output, ex.streamed)
            except AnswerFormatError as exc:
                mismatches += 1
                verdicts.append(verdict(CHECK_RERUN, ex.request_id, "unparsable_answer", {
                    "detail": str(exc), "endpoint": ex.endpoint,
                    "output": _excerpt(ex.output.decode("utf-8", "replace"), limit)}))
                continue
            try:
                reference_texts = await self._reference.answer(ex.endpoint, body)
            except ReferenceUnavailable as exc:
                reference_errors += 1
                log.warning("honesty.reference_failed node=%s job=%s error=%s", node, job, exc)
                continue
            if node_texts != reference_texts:
                mismatches += 1
                log.warning("honesty.rerun_mismatch node=%s job=%s request=%s",
                            node, job, ex.request_id)
                verdicts.append(verdict(CHECK_RERUN, ex.request_id, "answer_differs", {
                    "endpoint": ex.endpoint, "streamed": int(ex.streamed),
                    "input_sha256": sha256_hex(ex.request_body),
                    "first_difference": _first_difference(node_texts, reference_texts),
                    "node_answer": [_excerpt(t, limit) for t in node_texts],
                    "reference_answer": [_excerpt(t, limit) for t in reference_texts]}))

        seeded = [ex for ex in accepted
                  if (head := request_head(ex.request_body)) is not None and head.seeded_sampling]
        replay, replay_failures, replay_errors = await self._replay(seeded, receipts)
        reference_errors += replay_errors
        for request_id, reason, evidence in replay_failures:
            verdicts.append(verdict(CHECK_REPLAY, request_id, reason, evidence))

        refused = sum(1 for v in verdicts if v.check == CHECK_RECEIPT)
        replay_failed = len(replay_failures)
        failed = refused + mismatches + replay_failed
        if failed:
            outcome = Outcome.FAIL
            reason = f"{refused} receipts refused, {mismatches} of {len(sample)} re-runs differ"
            if replay_failed:
                reason += f"; replay: {replay_failures[0][1]}"
        elif not accepted:
            outcome = Outcome.UNKNOWN
            reason = f"unknown: none of {len(exchanges)} exchanges was answered"
        else:
            outcome = Outcome.PASS
            reason = f"{len(accepted)} receipts valid, {len(sample)} re-runs match"
        summary = VerdictRecord(
            verdict_id=f"{CHECK_JOB}|{node}|{job}|{to_ms(now)}", node_id=node, check=CHECK_JOB,
            outcome=outcome, reason=reason,
            evidence={"job_id": job, "exchanges": len(exchanges), "receipts_valid": len(accepted),
                      "receipts_refused": refused, "eligible": len(eligible),
                      "rerun": len(sample), "mismatches": mismatches,
                      "reference_errors": reference_errors, "seeded": len(seeded),
                      **({f"replay_{k}": v for k, v in replay.evidence().items() if v is not None}
                         | {"replay_outcome": replay.outcome.value} if replay is not None else {})},
            ts=now)
        verdicts.append(summary)
        await self._verdicts.record(verdicts)
        log.info("honesty.job_audited node=%s job=%s verdict=%s exchanges=%d rerun=%d "
                 "mismatches=%d refused=%d", node, job, summary.outcome.value, len(exchanges),
                 len(sample), mismatches, refused)
        return AuditReport(node_id=node, job_id=job, exchanges=len(exchanges), not_ok=not_ok,
                           receipts_valid=len(accepted), receipts_refused=refused,
                           eligible=len(eligible), rerun=len(sample), mismatches=mismatches,
                           reference_errors=reference_errors, seeded=len(seeded),
                           replayed_tokens=replay.positions if replay else 0,
                           replay_mismatches=replay.mismatches if replay else 0,
                           replay_outcome=replay.outcome if replay else None,
                           outcome=outcome, verdicts=verdicts)

    async def _replay(
        self, seeded: Sequence[JobExchange], receipts: Mapping[str, Receipt]
    ) -> tuple[ReplayJudgement | None, list[tuple[str, str, dict[str, Any]]], int]:
        """(the judgement over every replayed token, failures as (request id, reason,
        evidence), reference errors) for the audit's seeded sampled exchanges."""
        failures: list[tuple[str, str, dict[str, Any]]] = []
        results: list[ReplayResult] = []
        by_request: list[tuple[str, list[ReplayResult]]] = []
        errors = 0
        for ex in seeded:
            receipt = receipts[ex.request_id]
            commitment = token_commitment(ex)
            if receipt.version != 2 or commitment is None:
                failures.append((ex.request_id, "no_token_commitment", {
                    "endpoint": ex.endpoint, "detail": "a seeded sampled answer without a "
                    "receipt committing to its token ids cannot be replayed"}))
                continue
            try:
                texts = answer_texts(ex.endpoint, ex.output, ex.streamed)
                replayed = await self._reference.replay(
                    ex.endpoint, json.loads(ex.request_body), commitment.token_ids, texts)
            except (AnswerNotSpelled, AnswerFormatError) as exc:
                failures.append((ex.request_id, "token_ids_do_not_spell_answer", {
                    "endpoint": ex.endpoint, "detail": str(exc)}))
                continue
            except ReferenceUnavailable as exc:
                errors += 1
                log.warning("honesty.replay_unavailable request=%s error=%s", ex.request_id, exc)
                continue
            results.extend(replayed)
            by_request.append((ex.request_id, replayed))
        if not results:
            return None, failures, errors
        s = self._settings
        judgement = judge_replay(results, max_mismatch_share=s.replay_max_mismatch_share,
                                 min_positions=s.replay_min_tokens)
        if judgement.outcome is Outcome.FAIL:
            worst = max(by_request, key=lambda item: sum(r.mismatches for r in item[1]))
            failures.append((worst[0], "replay_differs", {
                **{k: v for k, v in judgement.evidence().items() if v is not None},
                "reason": judgement.reason,
                "mismatch_at": [list(r.mismatch_at[:20]) for r in worst[1]]}))
        return judgement, failures, errors
