"""What an evaluation run is: its spec (what to measure), its state, its progress, its
scored docs and its log lines.

These are the records the runner (``cluster/evaluations/``), the store
(``cluster/storage/mongo/evaluations.py``) and the API share; the HTTP wire models live in
``serve_apps/evaluations/protocol.py``. A run is identified by an opaque id; its relays are
keyed ``eval-<run id>|<task>|<doc>|0|<request index>`` so a resumed run finds the answers
it already has.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from cluster.core.errors import ErrorCode
from cluster.core.schemas import ApiKind, Node

# lm-eval's own API suffixes: an endpoint given with them is the same server.
_API_SUFFIXES = ("/v1/completions", "/v1/chat/completions", "/v1")

GenValue = str | bool | int | float | list[str]


class RunState(StrEnum):
    """A run's state, as TrustyAI's LMEvalJob names them, and ``failed``.

    new (submitted, nobody holds it) → scheduled (a replica claimed it: loading the tasks,
    counting docs) → running (sending requests) → complete | failed | cancelled. suspended:
    stopped on request (``POST .../suspend``), held by nobody, until resumed (back to new);
    docs already scored and requests already answered are never repeated. Runs stored
    before these names were ``queued`` (now new) or ``succeeded`` (now complete).
    """

    NEW = "new"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUSPENDED = "suspended"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def _missing_(cls, value: object) -> RunState | None:
        name = LEGACY_STATES.get(str(value))
        return cls(name) if name is not None else None

    @property
    def terminal(self) -> bool:
        return self in (RunState.COMPLETE, RunState.FAILED, RunState.CANCELLED)

    @property
    def active(self) -> bool:
        """A replica holds the run (its lease) and executes it."""
        return self in (RunState.SCHEDULED, RunState.RUNNING)

    @property
    def stored_names(self) -> list[str]:
        """The values a stored document's ``state`` may hold for this state."""
        return [self.value, *(old for old, new in LEGACY_STATES.items() if new == self.value)]


# Names of states in runs stored before LMEvalJob's names were adopted.
LEGACY_STATES = {"queued": "new", "succeeded": "complete"}


def endpoint_base_url(url: str) -> str:
    """The server's base URL: lm-eval users give ``.../v1/completions``, nodes ``...``."""
    base = url.rstrip("/")
    for suffix in _API_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


class CustomTaskSource(BaseModel):
    """A tenant's own lm-eval task folder: uploaded files (relative path → base64 bytes) or
    a folder of the offline data volume (``cluster/tasks/lmeval/custom.py`` checks both)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    files: dict[str, str] = Field(default_factory=dict)
    volume_path: str | None = None


class EvaluationSpec(BaseModel):
    """An lm-eval run against one OpenAI-compatible endpoint (already validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(description="base URL of the OpenAI-compatible server")
    model: str = Field(min_length=1, max_length=256)
    api: ApiKind = "completions"
    tasks: list[str] = Field(min_length=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    limit: int | None = Field(default=None, ge=1, description="first N docs of each eval split")
    gen_kwargs: dict[str, GenValue] = Field(default_factory=dict)
    tokenizer: str | None = None
    # lm-eval's prompting options (cluster/tasks/lmeval/adapter.py::RequestSettings)
    apply_chat_template: bool | None = None
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = True
    custom_tasks: list[CustomTaskSource] = Field(default_factory=list)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        url = HttpUrl(value)
        if url.query or url.fragment:
            raise ValueError("endpoint must be a base URL without query or fragment")
        return endpoint_base_url(str(url))

    def node(self, run_id: str) -> Node:
        """The endpoint as the measuring loop's Node: the Requester and adapters take it."""
        return Node(
            node_id=f"eval-{run_id}", url=self.endpoint, model=self.model, api=self.api,
            tokenizer=self.tokenizer,
        )

    def lmeval_model_args(self) -> str:
        """The ``model_args`` string an equivalent ``lm_eval`` command line would carry."""
        path = "/v1/chat/completions" if self.api == "chat-completions" else "/v1/completions"
        args = [f"base_url={self.endpoint}{path}", f"model={self.model}"]
        if self.tokenizer:
            args.append(f"tokenizer={self.tokenizer}")
        return ",".join(args)


class TaskProgress(BaseModel):
    """Docs of one task scored so far (``failed`` of them without a valid answer)."""

    model_config = ConfigDict(extra="forbid")

    task: str
    done: int = 0
    total: int | None = Field(default=None, description="None until the task's docs are counted")
    failed: int = 0


class EvaluationRun(BaseModel):
    """One run as stored: spec, state machine, progress, lease and revision.

    ``rev`` increases with every write; writers replace the whole document only if ``rev``
    is unchanged (compare-and-swap), so the API (cancel) and the executing replica
    (progress, lease) never overwrite each other's changes.
    """

    model_config = ConfigDict(extra="forbid")

    run_id: str
    tenant: str
    spec: EvaluationSpec
    state: RunState = RunState.NEW
    progress: list[TaskProgress] = Field(default_factory=list)
    percent: float = Field(default=0.0, ge=0, le=100, description="share of the work done, "
                           "docs scored plus the answered part of docs in flight")
    eta_s: float | None = Field(default=None, description="seconds left at ``progress_at``")
    progress_at: float | None = Field(default=None, description="when progress was measured")
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    cancel_requested: bool = False
    suspend_requested: bool = False
    owner: str | None = Field(default=None, description="the replica executing it")
    lease_until: float = 0.0
    attempts: int = Field(default=0, description="times a replica claimed it")
    rev: int = 0

    def progress_of(self, task: str) -> TaskProgress:
        for item in self.progress:
            if item.task == task:
                return item
        item = TaskProgress(task=task)
        self.progress.append(item)
        return item

    def summary(self) -> dict[str, Any]:
        """Fields for log lines."""
        return {"run": self.run_id, "tenant": self.tenant, "state": self.state.value}


class EvalSample(BaseModel):
    """One doc of one task of a run, scored (or failed with its error code)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    task: str
    doc_id: int
    error_code: ErrorCode
    error: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    latency_s: float | None = None
    records: list[dict[str, Any]] = Field(
        default_factory=list, description="lm-eval's per-filter sample records"
    )
    created_at: float

    @property
    def key(self) -> str:
        return f"{self.run_id}|{self.task}|{self.doc_id}"


class LogLine(BaseModel):
    """One line of a run's log."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="time-ordered; the SSE event id")
    run_id: str
    ts: float
    level: str
    message: str
