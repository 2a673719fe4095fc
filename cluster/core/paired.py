"""Paired scores: a node's score measured against the trusted reference doc by doc.

The trusted reference of a claimed model answers every doc of a task once, through the
same task adapter the loop measures nodes with (``cluster/honesty/reference_docs.py``);
its per-doc results are a :class:`ReferenceSet` of :class:`ReferenceDoc` records. A node's
**paired estimate** of a metric is then

    reference full-task score + mean over the node's sampled docs of (node − reference)

with the stderr of those per-doc differences. The reference's full-task score has no
sampling error (every doc), and the differences of an honest node are zero on almost every
doc (the same model, up to near ties), so its paired stderr is near zero after a handful of
docs where the raw mean's needs hundreds; a node that deviates shows it in the differences.

No I/O here: the records, the set's id, and the arithmetic (``testbench scores``, the
leaderboard, the results JSON and the benches all use it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.core.errors import ErrorCode

# What the reference's per-doc results are computed for: a completions node with lm-eval's
# default prompting (no chat template, no system instruction); a node registered with other
# prompting options sends other prompts and gets no paired score.
DEFAULT_PROMPTING = "default"
Z_95 = 1.959964


class ReferenceRequest(BaseModel):
    """One loglikelihood request of a doc as the reference scored it (teacher-forced), in
    the doc's request order: the tokens lm-eval sends, split where it splits them."""

    model_config = ConfigDict(extra="forbid")

    context_tokens: int = Field(ge=0, description="lm-eval's ctxlen")
    continuation_tokens: int = Field(ge=0)
    loglikelihood: float
    greedy: bool


class ReferenceGeneration(BaseModel):
    """One generation request of a doc as the reference answered it (greedy)."""

    model_config = ConfigDict(extra="forbid")

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[float]


class ReferenceDoc(BaseModel):
    """The reference's result on one doc: lm-eval's per-doc metrics, and what its requests
    gave (loglikelihoods, or generated answers)."""

    model_config = ConfigDict(extra="forbid")

    set_id: str
    doc_id: int = Field(ge=0)
    metrics: dict[str, float]
    requests: list[ReferenceRequest] = Field(default_factory=list)
    generations: list[ReferenceGeneration] = Field(default_factory=list)


class ReferenceSet(BaseModel):
    """The reference's per-doc results of one (model, task), as far as computed.

    ``set_id`` names what the results depend on: the claimed model, the task, the task's
    content hash, the reference's identity and the prompting; a set whose task content or
    reference changed is ``stale`` and not used. ``full`` is the full-task mean per metric
    once ``complete``. ``seconds`` and ``tokens`` are the validator's cost so far."""

    model_config = ConfigDict(extra="forbid")

    set_id: str
    model: str
    task: str
    task_sha256: str
    reference_id: str
    prompting: str = DEFAULT_PROMPTING
    output_type: str
    n_docs: int = Field(ge=0)
    docs_done: int = Field(default=0, ge=0)
    complete: bool = False
    stale: bool = False
    full: dict[str, float] = Field(default_factory=dict)
    mean_metrics: list[str] = Field(
        default_factory=list, description="metrics aggregated by a plain mean (pairable)")
    seconds: float = 0.0
    tokens: int = 0
    started_at: float
    updated_at: float
    completed_at: float | None = None


def reference_set_id(model: str, task: str, task_sha256: str, reference_id: str,
                     prompting: str = DEFAULT_PROMPTING) -> str:
    digest = hashlib.sha256(f"{task_sha256}|{reference_id}|{prompting}".encode()).hexdigest()
    return f"{model}|{task}|{digest[:16]}"


class PairedScore(BaseModel):
    """A node's paired estimate of one metric (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    mean: float = Field(description="reference full-task score + mean per-doc difference")
    stderr: float | None = Field(description="stderr of the per-doc differences (n >= 2)")
    n: int = Field(description="docs paired: the node's counted samples the reference has")
    mean_diff: float
    reference_mean: float = Field(description="the reference's full-task score")
    differing_docs: int = Field(description="docs where node and reference differ")


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and its analytic stderr (sample variance / n), None below two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def counted_values(rows: Iterable[Mapping[str, Any]], metric: str) -> dict[int, float]:
    """Doc id → the node's value of ``metric`` over samples that count against it (OK ones,
    and node/evaluation failures as 0, as the raw buffer counts them); a doc sampled in
    several epochs keeps its newest value (by ``created_at``)."""
    out: dict[int, tuple[float, float]] = {}
    for row in rows:
        code = ErrorCode(int(row["error_code"]))
        if not code.counts_against_node:
            continue
        doc, at = int(row["doc_id"]), float(row.get("created_at") or 0.0)
        if doc in out and out[doc][0] > at:
            continue
        value = (row.get("metrics") or {}).get(metric, 0.0) if code == ErrorCode.OK else 0.0
        out[doc] = (at, float(value))
    return {doc: value for doc, (_, value) in out.items()}


def paired_score(node: Mapping[int, float], reference: Mapping[int, float],
                 reference_full: float) -> PairedScore | None:
    """The paired estimate over the docs both have (None when there is none)."""
    docs = sorted(set(node) & set(reference))
    if not docs:
        return None
    diffs = [node[d] - reference[d] for d in docs]
    mean_diff, stderr = mean_stderr(diffs)
    return PairedScore(mean=reference_full + mean_diff, stderr=stderr, n=len(docs),
                       mean_diff=mean_diff, reference_mean=reference_full,
                       differing_docs=sum(1 for x in diffs if x != 0.0))


def paired_scores(rows: Sequence[Mapping[str, Any]], reference: ReferenceSet,
                  docs: Mapping[int, ReferenceDoc]) -> dict[str, PairedScore]:
    """Per pairable metric of a complete set, the node's paired estimate from its sample
    rows (buffer entries or sample documents: ``doc_id``, ``error_code``, ``metrics``)."""
    if not reference.complete or reference.stale:
        return {}
    out: dict[str, PairedScore] = {}
    for metric in reference.mean_metrics:
        if metric not in reference.full:
            continue
        ref = {d: doc.metrics[metric] for d, doc in docs.items() if metric in doc.metrics}
        score = paired_score(counted_values(rows, metric), ref, reference.full[metric])
        if score is not None:
            out[metric] = score
    return out


def docs_for_half_width(stdev: float, half_width: float, z: float = Z_95) -> int:
    """Docs a mean of per-doc values with standard deviation ``stdev`` needs for a
    confidence interval of ± ``half_width`` (normal approximation), at least 2."""
    if stdev <= 0:
        return 2
    return max(2, math.ceil((z * stdev / half_width) ** 2))
