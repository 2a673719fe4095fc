"""Wire format of the evaluations API and the leaderboard: the only module spelling JSON names.

``POST /v1/evaluations`` takes an :class:`EvaluationRequest` and answers 202 with an
:class:`EvaluationStatus`; the results endpoint answers lm-eval's own results JSON (not
modelled here: it is lm-eval's format). Malformed bodies get HTTP 422, well-formed ones the
deployment cannot run HTTP 400, both with an :class:`ErrorResponse` body.

Every number is bounded and every string free of control characters, so anything that passes
validation can be stored and echoed without surprises.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    UrlConstraints,
    ValidationInfo,
    field_validator,
)

from cluster.core.evaluations import CustomTaskSource, EvaluationSpec

# TrustyAI LMEvalJob's states, and failed (cluster/core/evaluations.py::RunState).
RunStateName = Literal[
    "new", "scheduled", "running", "suspended", "complete", "failed", "cancelled"]
# What ``GET /v1/evaluations?state=`` also accepts: the names runs had before (queued = new,
# succeeded = complete).
RunStateFilter = Literal[
    "new", "scheduled", "running", "suspended", "complete", "failed", "cancelled",
    "queued", "succeeded"]
ApiName = Literal["completions", "chat-completions"]

_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
MAX_INT = 2**53  # exact in JSON doubles and BSON int64 alike
MAX_GEN_KWARGS = 32

TaskName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")]
GenKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
GenString = Annotated[str, StringConstraints(max_length=1000, pattern=r"^[^\x00]*$")]
GenInt = Annotated[int, Field(ge=-MAX_INT, le=MAX_INT, strict=True)]
GenFloat = Annotated[float, Field(allow_inf_nan=False, ge=-1e12, le=1e12)]
GenValue = bool | GenInt | GenFloat | GenString | Annotated[list[GenString], Field(max_length=16)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_./\-]{0,255}$")]
MAX_FILE_CHARS = 17_000_000  # base64 of the largest allowed upload (settings cap it lower)


class CustomTaskIn(_Wire):
    """A tenant's own lm-eval task folder: uploaded ``files`` (relative path → base64 of the
    file: task/group YAMLs and jsonl/json/csv/parquet data) or ``volume_path``, a folder of
    the deployment's offline data volume. Its tasks and groups are then requested by name
    in ``tasks``."""

    files: dict[FileName, Annotated[str, StringConstraints(max_length=MAX_FILE_CHARS)]] = Field(
        default_factory=dict, max_length=64)
    volume_path: str | None = Field(default=None, min_length=1, max_length=512,
                                    pattern=r"^[A-Za-z0-9_][A-Za-z0-9_./\-]*$")

    @field_validator("volume_path")
    @classmethod
    def _one_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("files"):
            raise ValueError("give files or volume_path, not both")
        return value


class CustomTaskOut(_Wire):
    files: list[str] = Field(description="the uploaded files' names")
    volume_path: str | None


class EvaluationRequest(_Wire):
    """An lm-eval run against one OpenAI-compatible endpoint."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "endpoint": "http://127.0.0.1:8000/v1/completions", "model": "smollm2",
        "api": "completions", "tasks": ["openbookqa", "gsm8k"], "limit": 20,
        "gen_kwargs": {"max_gen_toks": 128}, "tokenizer": "/app/.cache/models/smollm2",
    }]})

    endpoint: Annotated[HttpUrl, UrlConstraints(max_length=2000)] = Field(
        description="the server's base URL (a trailing /v1/completions is accepted)"
    )
    model: str = Field(min_length=1, max_length=256, pattern=_PRINTABLE,
                       description="the model name sent in every request body")
    api: ApiName = Field(default="completions", description="which OpenAI API to call")
    tasks: list[TaskName] = Field(min_length=1, max_length=16, description="lm-eval task names")
    num_fewshot: int | None = Field(default=None, ge=0, le=64, strict=True,
                                    description="None = each task's own")
    limit: int | None = Field(default=None, ge=1, le=1_000_000, strict=True,
                              description="first N docs of each task's eval split (lm-eval --limit)")
    gen_kwargs: dict[GenKey, GenValue] = Field(
        default_factory=dict, description="merged into generation tasks' generation_kwargs"
    )
    tokenizer: str | None = Field(
        default=None, min_length=1, max_length=1024, pattern=_PRINTABLE,
        description="Hugging Face tokenizer path or id; None = the model name (as lm-eval)",
    )
    apply_chat_template: bool | None = Field(
        default=None, description="prompts through the chat template (lm-eval's "
        "--apply_chat_template); null = on for chat-completions, off for completions")
    system_instruction: str | None = Field(
        default=None, min_length=1, max_length=4096, pattern=r"^[^\x00]*$",
        description="prepended to every prompt (lm-eval's --system_instruction)")
    fewshot_as_multiturn: bool = Field(
        default=True, description="with a chat template, few-shot examples as separate turns")
    custom_tasks: list[CustomTaskIn] = Field(
        default_factory=list, max_length=8,
        description="the tenant's own task folders, whose tasks `tasks` may name")

    @field_validator("endpoint")
    @classmethod
    def _base_url(cls, value: HttpUrl) -> HttpUrl:
        if value.query or value.fragment:
            raise ValueError("endpoint must be a base URL without query or fragment")
        if value.username or value.password:
            raise ValueError("endpoint must not carry credentials")
        return value

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("tasks must be distinct")
        return value

    @field_validator("gen_kwargs")
    @classmethod
    def _few(cls, value: dict[str, object]) -> dict[str, object]:
        if len(value) > MAX_GEN_KWARGS:
            raise ValueError(f"at most {MAX_GEN_KWARGS} gen_kwargs")
        return value

    def to_spec(self) -> EvaluationSpec:
        """What the run measures; raises ``ValidationError`` for what the wire let through
        but a run cannot hold."""
        return EvaluationSpec(
            endpoint=str(self.endpoint), model=self.model, api=self.api, tasks=list(self.tasks),
            num_fewshot=self.num_fewshot, limit=self.limit, gen_kwargs=dict(self.gen_kwargs),
            tokenizer=self.tokenizer, apply_chat_template=self.apply_chat_template,
            system_instruction=self.system_instruction,
            fewshot_as_multiturn=self.fewshot_as_multiturn,
            custom_tasks=[CustomTaskSource(files=dict(c.files), volume_path=c.volume_path)
                          for c in self.custom_tasks],
        )


class EvaluationSpecOut(_Wire):
    """The run's request as the service normalised it."""

    endpoint: str
    model: str
    api: ApiName
    tasks: list[str]
    num_fewshot: int | None
    limit: int | None
    gen_kwargs: dict[str, bool | int | float | str | list[str]]
    tokenizer: str | None
    apply_chat_template: bool | None = None
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = True
    custom_tasks: list[CustomTaskOut] = Field(default_factory=list)


class TaskProgressOut(_Wire):
    task: str
    done: int = Field(description="docs scored")
    total: int | None = Field(description="docs to score; null until counted")
    failed: int = Field(description="docs without a valid answer (scored 0 or left out)")


class RunProgressOut(_Wire):
    """The whole run's progress, as LMEvalJob's progress bar reports it."""

    percent: float = Field(description="0-100: docs scored plus the answered share of the "
                                       "docs in flight, over every task's docs")
    count: str = Field(description="docs scored / docs to score ('?' until counted)")
    done: int = Field(description="docs scored")
    total: int | None = Field(description="docs to score; null until every task is counted")
    elapsed_s: float | None = Field(description="seconds since it first started (to its "
                                                "end once ended); null before")
    eta_s: float | None = Field(description="seconds left at the current attempt's rate; "
                                            "null unless running and measurable")
    updated_at: float | None = Field(description="when the counts were written (unix "
                                                 "seconds); every few seconds while running")


class EvaluationStatus(_Wire):
    id: str
    object: Literal["evaluation"] = "evaluation"
    state: RunStateName
    request: EvaluationSpecOut
    progress: list[TaskProgressOut]
    overall: RunProgressOut
    cancel_requested: bool
    suspend_requested: bool = Field(
        default=False, description="a suspend waits for the replica running it to stop")
    error: str | None
    attempts: int = Field(description="times a replica started or resumed it")
    created_at: float = Field(description="unix seconds")
    started_at: float | None
    finished_at: float | None
    updated_at: float


class EvaluationList(_Wire):
    object: Literal["list"] = "list"
    data: list[EvaluationStatus]
    total: int
    offset: int
    limit: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")


class ErrorDetail(_Wire):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Wire):
    error: ErrorDetail


class LogEvent(_Wire):
    """One log line of a run (the ``data`` of a ``log`` server-sent event)."""

    ts: float
    level: str
    message: str


class EndEvent(_Wire):
    """The ``data`` of the ``end`` event: the run reached a terminal state."""

    state: RunStateName
    error: str | None


class HealthResponse(_Wire):
    status: Literal["ok"] = "ok"
    owner: str | None = Field(description="this replica's run-owner id (null: API only)")
    active_runs: int


# ---------------------------------------------------------------------- leaderboard
class MetricScore(_Wire):
    mean: float
    stderr: float | None


class PairedMetric(_Wire):
    """A paired estimate (``cluster/core/paired.py``): the trusted reference's full-task
    score + the node's mean per-doc difference from it, with that difference's stderr."""

    mean: float
    stderr: float | None
    n: int = Field(description="docs paired")
    reference_mean: float = Field(description="the reference's full-task score")
    differing_docs: int


class LeaderboardCell(_Wire):
    """One node on one task: its buffer's summary (the measuring loop's last N samples)."""

    node_id: str
    task: str
    metric: str | None = Field(description="the headline metric shown in the table")
    mean: float | None
    stderr: float | None
    metrics: dict[str, MetricScore]
    paired: dict[str, PairedMetric] = Field(
        default_factory=dict, description="metric -> paired estimate, where the trusted "
        "reference's per-doc results of the task are complete")
    n: int
    error_rate: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    updated_at: float


class VerdictOut(_Wire):
    kind: str = Field(description="what was checked (poc, identity, substitution...)")
    label: Literal["pass", "fail", "unknown"] = Field(
        description="the outcome; unknown = the check could not be made (unverified)")
    passed: bool | None = Field(description="true for a pass, false for a fail, null for "
                                            "unknown: an unknown is never a pass")
    reason: str = ""
    at: float | None


class UnmeasurableCell(_Wire):
    """One node on one task that the loop cannot measure as configured (its task adapter or
    dataset is unusable): it has no fresh scores, and this says why."""

    node_id: str
    task: str
    reason: str
    since: float = Field(description="unix seconds of the first failed draw in a row")
    attempts: int = Field(description="draws in a row that failed (retried with backoff)")


class LeaderboardNode(_Wire):
    node_id: str
    model: str | None
    verdicts: list[VerdictOut]
    status: Literal["trusted", "unverified", "flagged", "unchecked"] = Field(
        default="unchecked",
        description="flagged: a latest verdict failed; unverified: none failed, one is unknown "
        "(not trusted); trusted: every latest verdict passed; unchecked: no verdict yet")


class ScoreSeries(_Wire):
    """A node's headline score on one task over time: the mean of its last ``window``
    counted samples after each sample (failed ones as 0), as ``[unix seconds, score]``."""

    node_id: str
    task: str
    metric: str
    window: int
    points: list[tuple[float, float]]


class LeaderboardGroup(_Wire):
    """A configured lm-eval group: its score per node is derived from its leaf tasks'
    buffers (``group_cells``); the page shows it with its subtasks folded under it."""

    group: str
    subtasks: list[str] = Field(description="its direct children (tasks and groups)")
    tasks: list[str] = Field(description="its leaf tasks, whose buffers make its score")


class LeaderboardResponse(_Wire):
    generated_at: float
    tasks: list[str]
    nodes: list[LeaderboardNode]
    cells: list[LeaderboardCell]
    series: list[ScoreSeries]
    unmeasurable: list[UnmeasurableCell] = Field(default_factory=list)
    groups: list[LeaderboardGroup] = Field(default_factory=list)
    group_cells: list[LeaderboardCell] = Field(
        default_factory=list, description="one per (node, group): lm-eval's group aggregate "
        "of the node's subtask buffers (n: their samples together; no latency)")
