"""Organic jobs: a user's own request, run on a chosen node or on any node claiming a model,
answered and recorded.

A job names either a node or a model. For a model, the candidates are the enabled LLM nodes
claiming it that no honesty check currently flags (each node's latest verdict per check:
the loop's verification rounds, evasion, receipt audits, PoC; and the loop's identity
signatures) and that are not *unverified* (a latest verdict unknown: a check that could not
be made is not a pass) unless ``honesty.route_unverified`` allows them, after the others; a
node no check has run on yet is eligible (the loop verifies new nodes first). The fastest by
measured median latency goes first, and when it fails (timeout, 5xx, garbage) the next one
is tried, up to ``max_nodes``. Every job is in
MongoDB (``organic_jobs``) *before* the first request leaves, and every attempt is recorded
with the loop's error codes, so nothing a user asked for is lost, answered or not. Requests
go through the measuring loop's :class:`cluster.nodes.requester.Requester`: the same SLA timeouts,
retries, response size cap and error codes as measuring traffic.
"""

from __future__ import annotations

import hashlib
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.core.errors import ErrorCode, NodeError, TestbenchError
from cluster.core.schemas import Node, Prompt
from cluster.core.settings import Settings
from cluster.storage.mongo import MongoStores
from cluster.wire import openai as wire

ORGANIC_TASK = "organic"


class NoNodeAvailable(TestbenchError):
    """No registered node can take the job (unknown node, or no eligible node claims the model)."""

    code = ErrorCode.BAD_PARAMS


class OrganicRequest(BaseModel):
    """What a user asks: a prompt for a node, or for any trusted node claiming a model."""

    model_config = ConfigDict(extra="forbid")

    node_id: str | None = Field(default=None, description="run on this node")
    model: str | None = Field(default=None, description="run on any node claiming this model")
    prompt: str = Field(min_length=1, max_length=100_000)
    api: Literal["chat-completions", "completions"] | None = Field(
        default=None, description="None = the node's own API")
    max_tokens: int = Field(default=256, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = None
    user: str = Field(default="cli", min_length=1, max_length=128)
    max_nodes: int = Field(default=3, ge=1, le=20, description="nodes tried for a model job")

    @model_validator(mode="after")
    def _one_target(self) -> OrganicRequest:
        if (self.node_id is None) == (self.model is None):
            raise ValueError("give exactly one of node_id (a chosen node) or model (any node "
                             "claiming it)")
        return self


@dataclass
class Attempt:
    node_id: str
    error_code: ErrorCode
    error: str | None
    status: int | None
    latency_s: float | None


@dataclass
class OrganicResult:
    job_id: str
    node_id: str | None
    model: str | None
    answer: str | None
    error_code: ErrorCode
    error: str | None
    latency_s: float | None
    attempts: list[Attempt] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error_code == ErrorCode.OK


def request_body(request: OrganicRequest, node: Node) -> tuple[str, dict[str, Any]]:
    api = request.api or node.api
    body: dict[str, Any] = {"model": node.model, "max_tokens": request.max_tokens,
                            "temperature": request.temperature}
    if request.seed is not None:
        body["seed"] = request.seed
    if api == "chat-completions":
        body["messages"] = [{"role": "user", "content": request.prompt}]
        return wire.CHAT_PATH, body
    body["prompt"] = request.prompt
    return wire.COMPLETIONS_PATH, body


def answer_text(path: str, response: Any) -> str:
    """The answer's text; :class:`NodeError` when the node's answer has the wrong shape."""
    if path == wire.CHAT_PATH:
        return wire.parse_chat(response).text
    return wire.parse_completion(response, 1)[0].text


def rank_candidates(
    nodes: Sequence[Node],
    model: str,
    flagged: Mapping[str, str],
    buffers: Sequence[Mapping[str, Any]],
    unverified: Mapping[str, str] | None = None,
    *,
    allow_unverified: bool = False,
) -> tuple[list[Node], dict[str, str]]:
    """Eligible nodes claiming ``model``, fastest first, and why the others were skipped.

    Speed is the median of the node's buffers' p50 latencies (nodes never measured go last,
    in registration order): a user's job should land where answers come back soonest.
    ``unverified`` nodes are skipped, or with ``allow_unverified`` ranked after the rest."""
    unverified = unverified or {}
    p50s: dict[str, list[float]] = {}
    for b in buffers:
        if b.get("latency_p50_s") is not None:
            p50s.setdefault(b["node_id"], []).append(float(b["latency_p50_s"]))
    skipped: dict[str, str] = {}
    eligible: list[tuple[bool, float, int, Node]] = []
    for order, node in enumerate(nodes):
        if node.model != model:
            continue
        if not node.enabled:
            skipped[node.node_id] = "disabled"
        elif node.kind != "llm":
            skipped[node.node_id] = f"a {node.kind} node"
        elif node.node_id in flagged:
            skipped[node.node_id] = f"flagged: {flagged[node.node_id]}"
        elif node.node_id in unverified and not allow_unverified:
            skipped[node.node_id] = (f"unverified: {unverified[node.node_id]} "
                                     "(honesty.route_unverified allows it)")
        else:
            speed = statistics.median(p50s[node.node_id]) if node.node_id in p50s else float("inf")
            eligible.append((node.node_id in unverified, speed, order, node))
    eligible.sort(key=lambda t: (t[0], t[1], t[2]))
    return [n for _, _, _, n in eligible], skipped


async def node_standing(settings: Settings, mongo: MongoStores, nodes: Sequence[Node]
                        ) -> tuple[dict[str, str], dict[str, str]]:
    """(flagged, unverified): node id -> reason, for the registry's nodes a check currently
    fails, and for those with no failed check but an unknown one (not trusted either)."""
    from cluster.core.verdicts import Outcome
    from cluster.honesty.verification import latest_verdicts
    from cluster.tasks.signature import read_signature_findings

    flagged: dict[str, str] = {}
    unknown: dict[str, str] = {}
    for v in await latest_verdicts(mongo, [n.node_id for n in nodes]):
        if v.flagged:
            flagged.setdefault(v.node_id, f"{v.check}: {v.reason}")
        elif v.outcome is Outcome.UNKNOWN:
            unknown.setdefault(v.node_id, f"{v.check}: {v.reason}")
    for node_id, finding in (await read_signature_findings(settings, mongo, nodes)).items():
        if finding.outcome.value == "fail":
            flagged.setdefault(node_id, f"identity signature: {finding.reason}")
    return flagged, {n: why for n, why in unknown.items() if n not in flagged}


async def flagged_nodes(settings: Settings, mongo: MongoStores, nodes: Sequence[Node]
                        ) -> dict[str, str]:
    """node id -> reason, for the registry's nodes an honesty check currently fails."""
    return (await node_standing(settings, mongo, nodes))[0]


class OrganicJobs:
    """Runs and records organic jobs (in :class:`cluster.storage.mongo.OrganicJobStore`)."""

    def __init__(self, settings: Settings, mongo: MongoStores, requester: Any | None = None
                 ) -> None:
        self._settings = settings
        self._mongo = mongo
        self._jobs = mongo.organic_jobs
        self._requester = requester

    async def _candidates(self, request: OrganicRequest) -> tuple[list[Node], dict[str, str]]:
        nodes = await self._mongo.nodes.list()
        if request.node_id is not None:
            chosen = [n for n in nodes if n.node_id == request.node_id]
            if not chosen:
                raise NoNodeAvailable(f"no node {request.node_id!r} is registered")
            if not chosen[0].enabled:
                raise NoNodeAvailable(f"node {request.node_id!r} is disabled")
            if chosen[0].kind != "llm":
                raise NoNodeAvailable(f"node {request.node_id!r} is a {chosen[0].kind} node")
            return chosen, {}
        assert request.model is not None
        flagged, unverified = await node_standing(self._settings, self._mongo, nodes)
        buffers = await self._mongo.buffers.summaries()
        ranked, skipped = rank_candidates(
            nodes, request.model, flagged, buffers, unverified,
            allow_unverified=self._settings.honesty.route_unverified)
        if not ranked:
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
            raise NoNodeAvailable(
                f"no eligible node claims model {request.model!r}"
                + (f" (skipped {detail})" if detail else " (none registered)"))
        return ranked[: request.max_nodes], skipped

    async def run(self, request: OrganicRequest) -> OrganicResult:
        """Run one job; raises :class:`NoNodeAvailable` (nothing recorded) when no node can
        take it, otherwise records it and returns the answer or the last failure."""
        from cluster.nodes.requester import Requester

        candidates, skipped = await self._candidates(request)
        job_id = uuid.uuid4().hex
        now = time.time()
        await self._jobs.open(job_id, {
            "user": request.user, "state": "running", "created_at": now,
            "request": request.model_dump(mode="json"),
            "prompt_sha256": hashlib.sha256(request.prompt.encode("utf-8")).hexdigest(),
            "candidates": [n.node_id for n in candidates], "skipped": skipped,
        })
        requester = self._requester or Requester(self._settings.requester)
        result = OrganicResult(job_id, None, request.model, None, ErrorCode.RELAY,
                               "not run", None, skipped=skipped)
        try:
            for node in candidates:
                path, body = request_body(request, node)
                key = f"organic|{job_id}|{node.node_id}"
                prompt = Prompt(
                    prompt_id=f"{key}|0", sample_key=key, node_id=node.node_id,
                    task=ORGANIC_TASK, doc_id=0, request_index=0, n_requests=1,
                    path=path,  # type: ignore[arg-type]
                    body=body, prompt_tokens=len(request.prompt) // 4,
                    max_output_tokens=request.max_tokens, created_at=time.time())
                (relay,) = await requester.relay([prompt], {node.node_id: node})
                code, error, answer = relay.error_code, relay.error, None
                if code == ErrorCode.OK:
                    try:
                        answer = answer_text(path, relay.response)
                    except NodeError as exc:
                        code, error = ErrorCode.NODE, f"malformed answer: {exc}"
                result.attempts.append(Attempt(node.node_id, code, error, relay.status,
                                               relay.latency_s))
                result.node_id, result.model = node.node_id, node.model
                result.error_code, result.error, result.latency_s = code, error, relay.latency_s
                result.answer = answer
                if code == ErrorCode.OK:
                    break
        finally:
            if self._requester is None:
                await requester.close()
            await self._jobs.finish(job_id, {
                "state": "done" if result.ok else "failed",
                "node_id": result.node_id, "model": result.model, "answer": result.answer,
                "error_code": int(result.error_code), "error": result.error,
                "latency_s": result.latency_s, "finished_at": time.time(),
                "attempts": [{"node_id": a.node_id, "error_code": int(a.error_code),
                              "error": a.error, "status": a.status, "latency_s": a.latency_s}
                             for a in result.attempts],
            })
        return result

    async def list(self, limit: int = 20, user: str | None = None) -> list[dict[str, Any]]:
        return await self._jobs.list(limit, user)
