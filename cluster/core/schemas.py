"""The records that flow between actors and into MongoDB.

Ids are deterministic so that a replayed step (after an actor restart) writes the same
record again instead of a new one:
- sample key: ``{node_id}|{task}|{doc_id}|{epoch}`` (one doc in one TTL window),
- prompt id: ``{sample_key}|{request_index}`` (one HTTP request),
- a relay's ``_id`` is its prompt id (exactly one relay per prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from cluster.core.errors import ErrorCode

ApiKind = Literal["completions", "chat-completions"]
NodeKind = Literal["llm", "diffusion"]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Node(Record):
    """A registered model endpoint (untrusted)."""

    node_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    url: HttpUrl
    model: str = Field(min_length=1, max_length=256, description="the model the node claims")
    api: ApiKind = "completions"
    kind: NodeKind = "llm"
    tokenizer: str | None = Field(default=None, description="HF tokenizer path or id")
    tasks: list[str] | None = Field(default=None, description="None = all configured tasks")
    enabled: bool = True
    # lm-eval's prompting options (RequestSettings in cluster/tasks/lmeval/adapter.py)
    apply_chat_template: bool | None = Field(
        default=None, description="prompts through the chat template; None = on for "
        "chat-completions (which needs it), off for completions")
    system_instruction: str | None = Field(default=None, max_length=4096,
                                           description="prepended to every prompt")
    fewshot_as_multiturn: bool = Field(
        default=True, description="with a chat template: few-shot examples as separate turns")
    seeded_sampling: bool = Field(
        default=False, description="the node samples seeded requests with testbench's "
        "replayable sampler (serve_apps/llm/seeded_sampling.py): verification rounds then "
        "replay its sampled answers on the reference")

    @model_validator(mode="after")
    def _chat_template(self) -> Node:
        if self.api == "chat-completions" and self.apply_chat_template is False:
            raise ValueError("apply_chat_template: a chat-completions node needs the chat "
                             "template (its requests are chat messages)")
        return self

    @field_validator("url")
    @classmethod
    def _base_url(cls, v: HttpUrl) -> HttpUrl:
        if v.query or v.fragment:
            raise ValueError("node url must be a base URL without query or fragment")
        return v

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")


def sample_key(node_id: str, task: str, doc_id: int, epoch: int) -> str:
    return f"{node_id}|{task}|{doc_id}|{epoch}"


def prompt_id(key: str, index: int) -> str:
    return f"{key}|{index}"


class SampleRequest(Record):
    """Manager → Sampler: draw ``count`` docs of ``task`` for ``node``."""

    node: Node
    task: str
    count: int = Field(ge=1)
    exclude_doc_ids: list[int] = Field(default_factory=list)
    epoch: int
    seed: int


class SampleDraw(Record):
    """Sampler → Manager: what was drawn for one :class:`SampleRequest`. ``error`` is set
    when the pair cannot be measured as configured (its task adapter or dataset is
    unusable): nothing was drawn, and the Manager backs the pair off with the reason."""

    node_id: str
    task: str
    epoch: int
    doc_ids: list[int] = Field(default_factory=list)
    error: str | None = None


class Prompt(Record):
    """One HTTP request to a node. Sampler → Requester."""

    prompt_id: str
    sample_key: str
    node_id: str
    task: str
    doc_id: int
    request_index: int
    n_requests: int = Field(description="how many prompts make up this doc's sample")
    path: Literal["/v1/completions", "/v1/chat/completions", "/v1/images/generations"]
    body: dict[str, Any]
    prompt_tokens: int = 0
    max_output_tokens: int = 0
    created_at: float


class Relay(Record):
    """A node's answer (or failure) for one prompt. Requester → Evaluator."""

    prompt_id: str
    sample_key: str
    node_id: str
    task: str
    doc_id: int
    request_index: int
    error_code: ErrorCode
    status: int | None = None
    error: str | None = None
    response: dict[str, Any] | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    attempts: int = 1
    started_at: float
    finished_at: float


class Sample(Record):
    """One doc scored for one node: lm-eval's per-doc metrics, or a failure with its code."""

    sample_key: str
    node_id: str
    task: str
    doc_id: int
    epoch: int
    error_code: ErrorCode
    metrics: dict[str, float] = Field(default_factory=dict)
    # what a check needs beside the numbers (the signature task's answer hashes)
    evidence: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    latency_s: float | None = None
    created_at: float


class ScoreSamples(Record):
    """Evaluator → Manager: the outcome of one batch."""

    node_id: str
    task: str
    samples: list[Sample]


# When relays of one doc fail differently, the node's fault wins: it is what the user
# must see; bench-side codes only when nothing was the node's fault.
_CODE_PRIORITY = {ErrorCode.NODE: 0, ErrorCode.EVALUATION: 1}


def failure_code(relays: Sequence[Relay]) -> ErrorCode | None:
    failed = [r.error_code for r in relays if r.error_code != ErrorCode.OK]
    if not failed:
        return None
    return min(failed, key=lambda c: (_CODE_PRIORITY.get(c, 2), int(c)))
