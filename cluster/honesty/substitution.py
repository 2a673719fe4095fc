"""The model-substitution check: is the node's token distribution the claimed model's?

On the round's canary prompts, two directions:

(a) **the node's tokens under the reference**: the node's greedy answer, teacher-forced
    through the reference. An honest node only ever picks the reference's best token or a
    near tie, so the mean *regret* (reference's best logprob minus the logprob of the
    node's token) is about 0 and the *reference agreement* (share of the node's tokens
    within ``tie_margin`` of the reference's best) about 1.
(b) **the reference's tokens under the node**: the node's logprobs (lm-eval's echo
    request: token ids, ``echo``, ``logprobs=1``) of the reference's greedy answer. An
    honest node reports the reference's logprobs up to engine noise: the *mean absolute
    logprob difference* is small, and the reference's tokens are the node's own greedy
    choices (*node agreement*).

The node fails when any statistic is past its threshold. (b) needs the completions API;
for a chat-only node only (a) is judged, and the evidence says so.

**What it cannot catch.** A node that forwards these requests to an honest deployment of
the claimed model, or answers them honestly while serving something cheaper elsewhere,
passes: logprob checks are laundered by forwarding (such a node is a proxy; the identity
check, and re-runs of its organic traffic, are the tools for it). Nor can it tell a
re-quantization finer than the honest engines' own spread (see README: bf16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cluster.honesty.reference import TokenScore
from cluster.honesty.verdicts import Outcome


@dataclass(frozen=True)
class SubstitutionThresholds:
    max_mean_abs_logprob_diff: float
    max_mean_regret: float
    min_reference_agreement: float
    min_node_agreement: float
    tie_margin: float


@dataclass(frozen=True)
class EchoScores:
    """The node's logprob of each reference token, and its best logprob there."""

    logprobs: tuple[float, ...]
    top_logprobs: tuple[float | None, ...]


@dataclass(frozen=True)
class SubstitutionStats:
    tokens_a: int
    mean_regret: float | None
    reference_agreement: float | None
    tokens_b: int
    mean_abs_logprob_diff: float | None
    max_abs_logprob_diff: float | None
    node_agreement: float | None
    exact_answers: int
    canaries: int

    def as_evidence(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def substitution_stats(
    node_scores_under_reference: Sequence[Sequence[TokenScore] | None],
    reference_scores: Sequence[Sequence[TokenScore]],
    echo: Sequence[EchoScores | None] | None,
    exact_answers: int,
    tie_margin: float,
) -> SubstitutionStats:
    """Statistics over all canaries (``None``: that canary could not be compared)."""
    regrets = [s.regret for seq in node_scores_under_reference if seq is not None for s in seq]
    diffs: list[float] = []
    node_greedy: list[bool] = []
    if echo is not None:
        for ref, node in zip(reference_scores, echo, strict=True):
            if node is None:
                continue
            for r, lp, top in zip(ref, node.logprobs, node.top_logprobs, strict=False):
                diffs.append(abs(lp - r.logprob))
                node_greedy.append(top is None or lp >= top - tie_margin)
    return SubstitutionStats(
        tokens_a=len(regrets),
        mean_regret=_mean(regrets),
        reference_agreement=_mean([1.0 if r <= tie_margin else 0.0 for r in regrets]),
        tokens_b=len(diffs),
        mean_abs_logprob_diff=_mean(diffs),
        max_abs_logprob_diff=max(diffs) if diffs else None,
        node_agreement=_mean([1.0 if g else 0.0 for g in node_greedy]),
        exact_answers=exact_answers,
        canaries=len(reference_scores),
    )


def judge_substitution(stats: SubstitutionStats, limits: SubstitutionThresholds
                       ) -> tuple[Outcome, str, dict[str, Any]]:
    evidence = stats.as_evidence()
    evidence["thresholds"] = {k: getattr(limits, k) for k in limits.__dataclass_fields__}
    if stats.tokens_a == 0 and stats.tokens_b == 0:
        return Outcome.UNKNOWN, "no canary tokens to compare", evidence
    problems: list[str] = []
    if stats.mean_abs_logprob_diff is not None and \
            stats.mean_abs_logprob_diff > limits.max_mean_abs_logprob_diff:
        problems.append(f"mean |logprob - reference| {stats.mean_abs_logprob_diff:.4f} > "
                        f"{limits.max_mean_abs_logprob_diff}")
    if stats.mean_regret is not None and stats.mean_regret > limits.max_mean_regret:
        problems.append(f"mean reference regret {stats.mean_regret:.4f} > "
                        f"{limits.max_mean_regret}")
    if stats.reference_agreement is not None and \
            stats.reference_agreement < limits.min_reference_agreement:
        problems.append(f"reference-greedy share {stats.reference_agreement:.3f} < "
                        f"{limits.min_reference_agreement}")
    if stats.node_agreement is not None and stats.node_agreement < limits.min_node_agreement:
        problems.append(f"node-greedy share of reference tokens {stats.node_agreement:.3f} < "
                        f"{limits.min_node_agreement}")
    if stats.tokens_b == 0:
        evidence["note"] = "no echo logprobs from the node: direction (b) not judged"
    if problems:
        return Outcome.FAIL, "; ".join(problems), evidence
    diff = "n/a" if stats.mean_abs_logprob_diff is None else f"{stats.mean_abs_logprob_diff:.4f}"
    return (Outcome.PASS,
            f"logprobs match the reference (mean |diff| {diff}, regret "
            f"{stats.mean_regret or 0.0:.4f})", evidence)
