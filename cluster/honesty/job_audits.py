"""Auditing a registered streaming job, as the loop does it on schedule and
``testbench receipts audit`` on demand.

Where the receipts come from: the validator is the job's client. A job is registered
(``testbench receipts register``: MongoDB ``streaming_jobs``, with the node it belongs to,
its app's URL and the key its receipts must be signed with); each audit sends
``receipts.audit_requests`` fresh temperature-0 ``/v1/completions`` requests through the
job's app (every other one streamed) and ``receipts.audit_sampled_requests`` seeded sampled
ones (``receipts.audit_temperature``, a fresh seed each, whose receipts commit to their token
ids and whose answers are replayed on the reference), keeps the exact bytes sent and received and its own
send and receive times (:class:`~cluster.honesty.receipt_audit.StreamingJobClient`), and
hands them to :class:`~cluster.honesty.receipt_audit.JobAuditor`: every receipt's
signature, key, hashes, clock skew and replay (MongoDB ``receipts``), and a seeded
``receipts.rerun_fraction`` (at least ``rerun_min``) re-run on the trusted reference of the
job's model. Only a client can check hashes and clock skew against what it actually sent
and got, so receipts a node reports about itself would prove little; a user holding their
own exchanges can have them audited with the same :class:`JobAuditor`.

The prompts are drawn from a fresh seed with the verification round's generators
(:mod:`cluster.honesty.probes`), so a node cannot tell audit traffic from its users' by
content it has seen before.

A job's app is an untrusted node's endpoint: registration and every audit obey the endpoint
policy with the Requester's allowlist (``requester.endpoint_allowlist``,
``cluster/nodes/policy.py``). A job the policy refuses is not registered; one refused at
audit time (a name re-pointed since) is sent nothing and gets an ``unknown`` verdict saying
why. The trusted references are reached on a session of their own, outside the policy.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from cluster.auth.receipts import JobAssignment, ReceiptVerifier, to_ms
from cluster.core.errors import NodeError, RegistrationError
from cluster.core.settings import Settings
from cluster.core.streaming import StreamingJob
from cluster.core.verdicts import Outcome, VerdictRecord
from cluster.honesty.probes import build_probes
from cluster.honesty.receipt_audit import (
    CHECK_JOB,
    AnswerNotSpelled,
    AuditReport,
    JobAuditor,
    JobExchange,
    ReferenceUnavailable,
    StreamingJobClient,
)
from cluster.honesty.reference import TrustedReference
from cluster.honesty.seeded_sampling import ReplayResult, SeededAnswer, choice_seed
from cluster.honesty.verdicts import VerdictSink
from cluster.honesty.verification import build_references
from cluster.nodes.policy import EndpointGuard, EndpointRefusedError
from cluster.nodes.transport import NodeEndpoint, NodeTransport, open_node_session
from cluster.storage.mongo import MongoStores
from cluster.streaming import protocol as jobs_wire

log = logging.getLogger(__name__)


class ReferenceAnswers:
    """The trusted reference (:class:`TrustedReference`) as the auditor's re-run source:
    greedy ``/v1/completions`` answers of the job's model; anything else is a reference
    error (no verdict), never blamed on the node."""

    def __init__(self, reference: TrustedReference | None, model: str) -> None:
        self._reference = reference
        self._model = model

    async def answer(self, endpoint: str, body: dict[str, Any]) -> list[str]:
        if self._reference is None:
            raise ReferenceUnavailable(f"no trusted reference for model {self._model!r}")
        if endpoint != jobs_wire.COMPLETIONS:
            raise ReferenceUnavailable(f"the reference re-runs {jobs_wire.COMPLETIONS} only")
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ReferenceUnavailable("the reference re-runs text prompts only")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ReferenceUnavailable(f"max_tokens {max_tokens!r} cannot be re-run")
        try:
            answers = await self._reference.generate(prompts, max_tokens)
        except Exception as exc:  # any reference failure is the bench's, not the node's
            raise ReferenceUnavailable(f"reference failed: {type(exc).__name__}: {exc}") from exc
        return [a.text for a in answers]


    async def replay(self, endpoint: str, body: dict[str, Any], token_ids: list[list[int]],
                     texts: list[str]) -> list[ReplayResult]:
        """Every choice of a seeded sampled completion, replayed teacher-forced on its ids.

        Choice ``k`` of a body with ``P`` prompts and ``n`` choices each answers prompt
        ``k // n`` with seed ``seed + k % n`` (vLLM's order and parallel-sampling seeds)."""
        if self._reference is None:
            raise ReferenceUnavailable(f"no trusted reference for model {self._model!r}")
        if endpoint != jobs_wire.COMPLETIONS:
            raise ReferenceUnavailable(f"the reference replays {jobs_wire.COMPLETIONS} only")
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        seed, temperature, n = body.get("seed"), body.get("temperature"), body.get("n") or 1
        if (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts)
                or not isinstance(seed, int) or not isinstance(temperature, int | float)
                or not isinstance(n, int) or n < 1):
            raise ReferenceUnavailable("the reference replays text prompts with a seed only")
        if len(token_ids) != len(prompts) * n or len(texts) != len(token_ids):
            raise AnswerNotSpelled(f"{len(token_ids)} token-id lists and {len(texts)} texts "
                                   f"for {len(prompts) * n} choices")
        answers: list[SeededAnswer] = []
        for k, (ids, text) in enumerate(zip(token_ids, texts, strict=True)):
            if self._reference.decode(ids) != text:
                raise AnswerNotSpelled(f"choice {k}: the token ids decode to another text")
            answers.append(SeededAnswer(
                tuple(self._reference.encode_prompt(prompts[k // n])), tuple(ids),
                choice_seed(seed, k % n), float(temperature)))
        try:
            return await self._reference.replay_seeded(answers)
        except Exception as exc:  # any reference failure is the bench's, not the node's
            raise ReferenceUnavailable(f"reference failed: {type(exc).__name__}: {exc}") from exc


def audit_requests(seed: int, n: int, model: str, max_tokens: int, *, sampled: int = 0,
                   temperature: float = 0.7, sampled_max_tokens: int = 160,
                   ) -> list[tuple[str, dict[str, Any]]]:
    """``n`` temperature-0 completions requests from ``seed``, every other one streamed, then
    ``sampled`` seeded sampled ones (natural-text openings, a seed each, every other one
    streamed)."""
    probes = build_probes(seed, identity=n, identity_words=10, synthetic=n, canary=n)
    texts = [text for _, _, text in probes.request_order()][:n]
    out = [(jobs_wire.COMPLETIONS, {"model": model, "prompt": text, "max_tokens": max_tokens,
                                    "temperature": 0, "stream": i % 2 == 1})
           for i, text in enumerate(texts)]
    rng = random.Random(seed)
    openings = build_probes(rng.getrandbits(31), identity=0, identity_words=10, synthetic=0,
                            canary=sampled).canary
    for i, text in enumerate(openings):
        out.append((jobs_wire.COMPLETIONS, {
            "model": model, "prompt": text, "max_tokens": sampled_max_tokens,
            "temperature": temperature, "seed": rng.getrandbits(31), "stream": i % 2 == 1,
            jobs_wire.RETURN_TOKEN_IDS: True}))
    return out


async def audit_job(
    settings: Settings,
    stores: MongoStores,
    job: StreamingJob,
    references: Mapping[str, TrustedReference],
    http: aiohttp.ClientSession,
    *,
    guard: EndpointGuard | None = None,
    sink: VerdictSink | None = None,
    seed: int | None = None,
    clock: Callable[[], float] = time.time,
) -> AuditReport:
    """Query ``job``'s app with fresh requests and audit what came back; verdicts through
    ``sink`` (default the verdict store), the job marked audited. ``http`` is the nodes'
    session, opened with ``guard`` (default: the endpoint policy with
    ``requester.endpoint_allowlist``); a job the policy refuses is sent nothing."""
    guard = EndpointGuard.of(settings.requester.endpoint_allowlist) if guard is None else guard
    sink = stores.verdicts if sink is None else sink
    try:
        await guard.check_url(job.base_url)
    except EndpointRefusedError as exc:
        return await _refused_audit(stores, job, exc, sink, clock())
    seed = secrets.randbits(31) if seed is None else seed
    client = StreamingJobClient(job.base_url, job.job_id, http, clock,
                                timeout_s=settings.honesty.request_timeout_s, guard=guard)
    exchanges: list[JobExchange] = []
    unanswered = 0
    r = settings.receipts
    for endpoint, body in audit_requests(seed, r.audit_requests, job.model,
                                         settings.honesty.max_tokens,
                                         sampled=r.audit_sampled_requests,
                                         temperature=r.audit_temperature,
                                         sampled_max_tokens=r.audit_sampled_max_tokens):
        try:
            exchanges.append(await client.call(endpoint, body))
        except NodeError as exc:
            unanswered += 1
            log.warning("honesty.job_unanswered job=%s error=%s", job.job_id, exc)
    verifier = ReceiptVerifier(stores.receipts, settings.receipts.max_clock_skew_s, clock)
    auditor = JobAuditor(verifier, ReferenceAnswers(references.get(job.model), job.model),
                         sink, settings.receipts,
                         random.Random(seed), clock)
    report = await auditor.audit(
        JobAssignment(job_id=job.job_id, node_id=job.node_id, node_key=job.node_key), exchanges)
    await stores.streaming_jobs.mark_audited(job.job_id, clock())
    if unanswered:
        log.info("honesty.job_audit_partial job=%s unanswered=%d", job.job_id, unanswered)
    return report


async def _refused_audit(stores: MongoStores, job: StreamingJob, refusal: EndpointRefusedError,
                         sink: VerdictSink, now: float) -> AuditReport:
    """The audit of a job whose app the endpoint policy refuses: one ``unknown`` verdict."""
    log.warning("honesty.job_refused job=%s reason=%s", job.job_id, refusal)
    evidence: dict[str, Any] = {"job_id": job.job_id, "exchanges": 0, "endpoint": "refused"}
    if refusal.refusal is not None:
        evidence["address_class"] = refusal.refusal.cls.value
    summary = VerdictRecord(
        verdict_id=f"{CHECK_JOB}|{job.node_id}|{job.job_id}|{to_ms(now)}", node_id=job.node_id,
        check=CHECK_JOB, outcome=Outcome.UNKNOWN, reason=f"unknown: {refusal}",
        evidence=evidence, ts=now)
    await sink.record([summary])
    await stores.streaming_jobs.mark_audited(job.job_id, now)
    return AuditReport(node_id=job.node_id, job_id=job.job_id, exchanges=0, not_ok=0,
                       receipts_valid=0, receipts_refused=0, eligible=0, rerun=0, mismatches=0,
                       reference_errors=0, outcome=Outcome.UNKNOWN, verdicts=[summary])


async def register_streaming_job(
    settings: Settings,
    stores: MongoStores,
    job_id: str,
    node_id: str,
    url: str,
    *,
    model: str | None = None,
    node_key: str | None = None,
    clock: Callable[[], float] = time.time,
) -> StreamingJob:
    """Register a job for the loop's audits. ``model`` defaults to the node's; ``node_key``
    to what the job's app says it signs with (``GET /job``, which must name ``job_id``):
    from then on receipts must carry that key. A ``url`` the endpoint policy refuses
    (``requester.endpoint_allowlist``) is a :class:`RegistrationError`."""
    node = await stores.nodes.get(node_id)
    if node is None:
        raise RegistrationError(f"no node {node_id!r} is registered")
    guard = EndpointGuard.of(settings.requester.endpoint_allowlist)
    try:
        await guard.check_url(url)
    except EndpointRefusedError as exc:
        raise RegistrationError(
            f"streaming job {job_id}: {exc}; to audit it anyway, add its network or host to "
            "requester.endpoint_allowlist") from exc
    if node_key is None:
        async with open_node_session(guard=guard) as http:
            endpoint = NodeEndpoint(url, NodeTransport(http, guard=guard),
                                    settings.honesty.request_timeout_s)
            try:
                info = jobs_wire.JobInfo.model_validate(await endpoint.get_json("/job"))
            except (NodeError, ValueError) as exc:
                raise RegistrationError(f"cannot read the job's key from {url}/job: {exc}"
                                        ) from exc
        if info.job_id != job_id:
            raise RegistrationError(f"{url} serves job {info.job_id!r}, not {job_id!r}")
        node_key = info.node_key
    try:
        job = StreamingJob(job_id=job_id, node_id=node_id, url=url,  # type: ignore[arg-type]
                           node_key=node_key, model=model or node.model, registered_at=clock())
    except ValueError as exc:
        raise RegistrationError(f"invalid streaming job: {exc}") from exc
    return await stores.streaming_jobs.add(job)


async def audit_registered_jobs(
    settings: Settings,
    stores: MongoStores,
    job_ids: list[str] | None = None,
    references: Mapping[str, TrustedReference] | None = None,
) -> list[tuple[StreamingJob, AuditReport]]:
    """Audit the enabled registered jobs (or ``job_ids``) now, as the loop does on schedule
    (what ``testbench receipts audit`` runs); ``references`` default to the configured ones."""
    jobs = await stores.streaming_jobs.list(enabled_only=job_ids is None)
    if job_ids is not None:
        unknown = sorted(set(job_ids) - {j.job_id for j in jobs})
        if unknown:
            raise RegistrationError(f"no streaming job {unknown[0]!r} is registered")
        jobs = [j for j in jobs if j.job_id in job_ids]
    out: list[tuple[StreamingJob, AuditReport]] = []
    guard = EndpointGuard.of(settings.requester.endpoint_allowlist)
    # the jobs' session obeys the endpoint policy; the references' (trusted) one does not
    async with open_node_session(guard=guard) as http, open_node_session() as reference_http:
        refs = build_references(settings.honesty, reference_http) if references is None \
            else references
        for job in jobs:
            out.append((job, await audit_job(settings, stores, job, refs, http, guard=guard)))
    return out
