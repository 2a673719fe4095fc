"""Synthetic jobs: prompts whose temperature-0 answers the validator computed on
the trusted reference; the node must reproduce them.

ComputeHorde checks such jobs by exact match, which holds when node and reference run the
same engine. Across engines (vLLM on a GPU vs transformers on a CPU) greedy decoding can
part at a *near tie*: two tokens whose logprobs differ by less than the engines' numerical
noise. So an answer agrees with the reference when

- it is the same text, or the same tokens, or
- at the first token where they part, the node's token is within ``tie_margin`` nats of
  the reference's best token at that position (the reference scores the node's answer
  teacher-forced); what follows a legitimate split is not comparable and is not judged.

The check fails when fewer than ``min_share`` of the prompts agree. Whatever follows a tie
is left to the substitution check, which scores every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cluster.honesty.reference import ReferenceAnswer, TokenScore
from cluster.honesty.verdicts import Outcome


@dataclass(frozen=True)
class SyntheticItem:
    """One synthetic prompt: what the reference said, what the node said, and whether
    they agree."""

    expected_tokens: int
    prefix_tokens: int  # tokens equal from the start
    exact: bool
    divergence_regret: float | None  # reference regret of the node's first differing token
    agrees: bool

    @property
    def prefix_share(self) -> float:
        return self.prefix_tokens / self.expected_tokens if self.expected_tokens else 1.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def judge_item(expected: ReferenceAnswer, answer: str, answer_ids: Sequence[int],
               scores: Sequence[TokenScore], tie_margin: float) -> SyntheticItem:
    """``scores``: the reference's teacher-forced scores of ``answer_ids``."""
    exact = answer == expected.text or list(answer_ids) == list(expected.token_ids)
    prefix = common_prefix(expected.token_ids, answer_ids)
    regret: float | None = None
    if not exact and prefix < len(answer_ids) and prefix < len(scores):
        regret = scores[prefix].regret
    # A node that stops early, or runs on, where the reference does not, has not tied.
    agrees = exact or (regret is not None and regret <= tie_margin)
    return SyntheticItem(len(expected.token_ids), prefix, exact, regret, agrees)


def judge_synthetic(items: Sequence[SyntheticItem | None], min_share: float
                    ) -> tuple[Outcome, str, dict[str, Any]]:
    """``None`` items: the node gave no answer to that prompt."""
    answered = [i for i in items if i is not None]
    if not answered:
        return Outcome.UNKNOWN, "no synthetic answers", {"prompts": len(items)}
    agree = sum(1 for i in answered if i.agrees)
    share = agree / len(items)
    evidence = {
        "prompts": len(items), "answered": len(answered), "agree": agree,
        "exact": sum(1 for i in answered if i.exact), "agree_share": share,
        "mean_prefix_share": sum(i.prefix_share for i in answered) / len(answered),
        "divergence_regrets": [i.divergence_regret for i in answered
                               if i.divergence_regret is not None],
        "min_share": min_share,
    }
    if share < min_share:
        return (Outcome.FAIL,
                f"{agree}/{len(items)} synthetic answers match the reference (need "
                f"{min_share:.0%})", evidence)
    return Outcome.PASS, f"{agree}/{len(items)} synthetic answers match the reference", evidence
