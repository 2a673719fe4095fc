"""Seeded sampling that any engine can replay, and the replay that checks it.

A sampled token is ``argmax_v(logits[v] / T + g(seed, position, v))`` with the Gumbel noise
``g = -log(-log(u))`` and ``u`` a uniform drawn from a keyed hash of (seed, position, token
id): the Gumbel-max trick, so the pick follows ``softmax(logits / T)`` exactly as plain
sampling does, but the noise is a **pure function of public inputs**. Any engine holding
the same model recomputes the same noise, so a validator can take the token ids a node
committed to, run the trusted reference teacher-forced over prompt + answer, recompute its
own pick at every position and count the positions where it differs
(:func:`replay_from_logits`). An honest node disagrees only where two perturbed scores sit
closer than the engines' float noise (rare); a cheaper model disagrees wherever its logits
move the winner.

The noise (version ``NOISE_VERSION``):

- ``position`` is the token's absolute index in the sequence: ``len(prompt_ids) + i`` for
  the answer's ``i``-th token. A prompt + answer prefix sent as a new prompt therefore
  continues with the same noise, which is how a reference reached over HTTP replays
  teacher-forced (:class:`cluster.honesty.reference.ServeReference`).
- ``(k1, k2)`` = the first two big-endian 32-bit words of
  ``sha256(NOISE_DOMAIN || seed as 8 signed big-endian bytes || position as 8 big-endian bytes)``;
- ``h = fmix32(fmix32(token_id XOR k1) XOR k2)`` (MurmurHash3's 32-bit finaliser);
- ``u = (h + 0.5) / 2**32`` and ``g = -log(-log(u))`` in float64; scores in float64.

:func:`uniform_reference` spells this in plain Python integers; the vectorised
:func:`gumbel_noise` must equal it (``tests/cluster/honesty/test_seeded_sampling.py``).
Choice ``j`` of an ``n > 1`` request is sampled with ``seed + j`` (vLLM's rule for parallel
sampling). Only temperature shapes the distribution: top-p, top-k, min-p, penalties and
logit biases are refused by the node (``serve_apps/llm/seeded_sampling.py``), since a replay
would have to repeat them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cluster.core.verdicts import Outcome

if TYPE_CHECKING:  # torch is imported where noise is computed: judging needs none
    import torch

    from cluster.core.settings import ReceiptSettings

NOISE_VERSION = "testbench-gumbel-v1"
NOISE_DOMAIN = b"testbench-gumbel-v1\n"
MASK32 = 0xFFFFFFFF
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35
MIN_TEMPERATURE = 1e-5  # below it a request is greedy (vLLM's own epsilon)


def position_keys(seed: int, position: int) -> tuple[int, int]:
    """The two 32-bit keys of one (seed, position)."""
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    digest = hashlib.sha256(NOISE_DOMAIN + int(seed).to_bytes(8, "big", signed=True)
                            + int(position).to_bytes(8, "big")).digest()
    return int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:8], "big")


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * _FMIX_C1) & MASK32
    h ^= h >> 13
    h = (h * _FMIX_C2) & MASK32
    h ^= h >> 16
    return h


def uniform_reference(seed: int, position: int, token_id: int) -> float:
    """The noise's uniform for one token, in plain Python (the specification)."""
    k1, k2 = position_keys(seed, position)
    h = _fmix32_int(_fmix32_int((token_id ^ k1) & MASK32) ^ k2)
    return (h + 0.5) / 2.0**32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX_C2)
    return h ^ (h >> 16)


def uniforms(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """``u`` for token ids ``0..vocab_size-1`` at one position (float64, CPU)."""
    import torch

    k1, k2 = position_keys(seed, position)
    tokens = torch.arange(vocab_size, dtype=torch.int64)
    h = _fmix32(_fmix32(tokens ^ k1) ^ k2)
    return (h.to(torch.float64) + 0.5) * (1.0 / 2.0**32)


def gumbel_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """The Gumbel noise of every token id at one position (float64, CPU)."""
    import torch

    return -torch.log(-torch.log(uniforms(seed, position, vocab_size)))


def perturbed_scores(logits: torch.Tensor, seed: int, position: int,
                     temperature: float) -> torch.Tensor:
    """``logits / T + g`` for one position's logits row (float64, CPU)."""
    import torch

    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"seeded sampling needs a temperature >= {MIN_TEMPERATURE}")
    row = logits.detach().to("cpu", torch.float64).reshape(-1)
    return row / float(temperature) + gumbel_noise(seed, position, row.shape[0])


def seeded_pick(logits: torch.Tensor, seed: int, position: int, temperature: float) -> int:
    """The token seeded sampling picks from one position's logits."""
    import torch

    return int(torch.argmax(perturbed_scores(logits, seed, position, temperature)))


def choice_seed(seed: int, index: int) -> int:
    """The seed choice ``index`` of an ``n``-choice request is sampled with."""
    return int(seed) + int(index)


@dataclass(frozen=True)
class SeededAnswer:
    """One answer a node claims to have sampled with seeded sampling: what a replay needs."""

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    seed: int
    temperature: float

    def positions(self) -> range:
        """The absolute positions of the answer's tokens (the noise's ``position``)."""
        start = len(self.prompt_ids)
        return range(start, start + len(self.token_ids))


@dataclass(frozen=True)
class ReplayResult:
    """The reference's teacher-forced picks against one answer's committed token ids.

    ``margins[i]``: how far the node's token scores below the reference's own pick at
    position ``i``, in perturbed-score units (``logit / T + g``); 0 where they agree. A
    honest engine's mismatches have margins at float-noise size, a cheaper model's are
    spread up to its logit error over T. ``None`` where the replay had no logits
    (:class:`~cluster.honesty.reference.ServeReference` counts picks only).
    """

    positions: int
    mismatches: int
    first_mismatch: int | None
    margins: tuple[float, ...] | None = None
    mismatch_at: tuple[int, ...] = field(default=())

    @property
    def match_share(self) -> float:
        return 1.0 - self.mismatches / self.positions if self.positions else 1.0


def replay_from_logits(logits: torch.Tensor, answer: SeededAnswer) -> ReplayResult:
    """Judge one answer against the reference's teacher-forced logits ``[len(token_ids), V]``
    (row ``i`` predicts ``token_ids[i]`` from prompt + ``token_ids[:i]``)."""
    import torch

    if logits.shape[0] != len(answer.token_ids):
        raise ValueError(f"{logits.shape[0]} logits rows for {len(answer.token_ids)} tokens")
    margins: list[float] = []
    at: list[int] = []
    for i, (position, token) in enumerate(zip(answer.positions(), answer.token_ids,
                                              strict=True)):
        scores = perturbed_scores(logits[i], answer.seed, position, answer.temperature)
        pick = int(torch.argmax(scores))
        if not 0 <= token < scores.shape[0]:
            margins.append(math.inf)
            at.append(i)
            continue
        margin = float(scores[pick] - scores[token])
        margins.append(margin)
        if pick != token:
            at.append(i)
    return ReplayResult(positions=len(answer.token_ids), mismatches=len(at),
                        first_mismatch=at[0] if at else None, margins=tuple(margins),
                        mismatch_at=tuple(at))


@dataclass(frozen=True)
class ReplayJudgement:
    """The outcome of a node's replayed answers, with the figures behind it."""

    outcome: Outcome
    reason: str
    answers: int
    positions: int
    mismatches: int
    mismatch_share: float
    max_mismatch_share: float
    mean_margin: float | None

    def evidence(self) -> dict[str, float | int | str | None]:
        return {"answers": self.answers, "positions": self.positions,
                "mismatches": self.mismatches, "mismatch_share": self.mismatch_share,
                "max_mismatch_share": self.max_mismatch_share, "mean_margin": self.mean_margin,
                "noise": NOISE_VERSION}


def judge_replay(results: Sequence[ReplayResult], *, max_mismatch_share: float,
                 min_positions: int) -> ReplayJudgement:
    """Fail when more than ``max_mismatch_share`` of all replayed positions differ; unknown
    when fewer than ``min_positions`` were replayed (too few to tell)."""
    positions = sum(r.positions for r in results)
    mismatches = sum(r.mismatches for r in results)
    share = mismatches / positions if positions else 0.0
    finite = [m for r in results if r.margins is not None for m in r.margins if math.isfinite(m)]
    mean_margin = sum(finite) / len(finite) if finite else None
    if positions < min_positions:
        outcome = Outcome.UNKNOWN
        reason = (f"unknown: {positions} replayed tokens, fewer than the {min_positions} "
                  f"needed to judge")
    elif share > max_mismatch_share:
        outcome = Outcome.FAIL
        reason = (f"{mismatches} of {positions} replayed tokens ({share:.2%}) are not the "
                  f"reference's seeded pick (allowed {max_mismatch_share:.2%})")
    else:
        outcome = Outcome.PASS
        reason = f"{positions - mismatches} of {positions} replayed tokens match"
    return ReplayJudgement(outcome=outcome, reason=reason, answers=len(results),
                           positions=positions, mismatches=mismatches, mismatch_share=share,
                           max_mismatch_share=max_mismatch_share, mean_margin=mean_margin)


class SeededReplayer(Protocol):
    """What can replay seeded answers: every trusted reference
    (``cluster/honesty/reference.py``, ``TrustedReference.replay_seeded``)."""

    async def replay_seeded(self, answers: Sequence[SeededAnswer]) -> list[ReplayResult]: ...


async def replay_and_judge(
    reference: SeededReplayer, answers: Sequence[SeededAnswer],
    settings: ReceiptSettings | None = None,
) -> tuple[ReplayJudgement, list[ReplayResult]]:
    """Replay a node's seeded sampled answers on the trusted reference and judge them
    together with ``settings``' replay thresholds (default: ``ReceiptSettings()``)."""
    from cluster.core.settings import ReceiptSettings

    s = settings or ReceiptSettings()
    results = await reference.replay_seeded(answers)
    judgement = judge_replay(results, max_mismatch_share=s.replay_max_mismatch_share,
                             min_positions=s.replay_min_tokens)
    return judgement, results
