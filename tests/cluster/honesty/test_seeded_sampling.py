"""Seeded sampling: the noise is the specified pure function, the Gumbel-max pick samples
softmax(logits / T), and a teacher-forced replay on the trusted reference flags cheaper
models that sample with the same noise.

The cheaper models run in this process (transformers, float32): SmolLM2 with its decoder
linears re-quantized to int8 and SmolLM2 with every other decoder block dropped
(``cluster/testing/weights.py``). Each samples seeded answers at temperature 0.7 (the int8
model at least 300 tokens, the half-layer model, which misses ~90% of picks, 100); the
reference (a load of its own) replays them. The honest node's side is
``tests/serve_apps/llm/test_llm_seeded.py`` (the vLLM node against the same reference).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from cluster.core.settings import ReceiptSettings
from cluster.core.verdicts import Outcome
from cluster.honesty.local_lm import LocalCausalLM
from cluster.honesty.reference import TransformersReference
from cluster.honesty.seeded_sampling import (
    SeededAnswer,
    gumbel_noise,
    judge_replay,
    replay_and_judge,
    replay_from_logits,
    seeded_pick,
    uniform_reference,
    uniforms,
)
from cluster.testing.weights import keep_every_other_layer, requantize_int8

log = logging.getLogger(__name__)

TEMPERATURE = 0.7
PROMPTS = ("Once upon a time, a lonely lighthouse", "The history of bread begins",
           "Scientists who study bees have found that", "In the ancient library, there was")
# (max tokens per answer, fewest replayed tokens) per cheaper model
LENGTHS = {"int8": (96, 300), "half_layers": (32, 100)}


def test_the_noise_is_the_specified_pure_function() -> None:
    # pinned values: any engine implementing the spec must reproduce them
    assert uniform_reference(0, 0, 0) == 0.08884547476191074
    assert uniform_reference(-7, 100, 49151) == 0.5414431359386072
    assert uniform_reference(2**62, 7, 12345) == 0.7556082844967023
    for seed, position in ((0, 0), (-7, 100), (2**62, 7), (123456789, 4095)):
        u = uniforms(seed, position, 49152)
        for token in (0, 1, 2, 4097, 49151):
            assert u[token].item() == uniform_reference(seed, position, token)
    u = uniforms(5, 9, 49152)
    assert 0.0 < u.min().item() and u.max().item() < 1.0 and abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(gumbel_noise(5, 9, 64), gumbel_noise(5, 10, 64))
    assert torch.equal(gumbel_noise(5, 9, 64), gumbel_noise(5, 9, 64))


def test_the_seeded_pick_samples_softmax_at_the_temperature() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0, -3.0])
    n = 4000
    counts = torch.zeros(5)
    for position in range(n):
        counts[seeded_pick(logits, 11, position, TEMPERATURE)] += 1
    expected = torch.softmax(logits / TEMPERATURE, 0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5, (counts, expected)  # 4 degrees of freedom, p = 0.001


def test_a_replay_counts_exactly_the_positions_that_differ() -> None:
    vocab = 50
    logits = torch.randn(20, vocab, generator=torch.Generator().manual_seed(3)) * 3
    prompt = (1, 2, 3)
    picks = [seeded_pick(logits[i], 8, len(prompt) + i, TEMPERATURE) for i in range(20)]
    altered = list(picks)
    for i in (4, 11):
        altered[i] = (picks[i] + 1) % vocab
    result = replay_from_logits(logits, SeededAnswer(prompt, tuple(altered), 8, TEMPERATURE))
    assert (result.positions, result.mismatches, result.mismatch_at) == (20, 2, (4, 11))
    assert result.margins is not None and all(result.margins[i] > 0 for i in (4, 11))
    assert sum(m > 0 for m in result.margins) == 2
    judged = judge_replay([result], max_mismatch_share=0.05, min_positions=10)
    assert judged.outcome is Outcome.FAIL and judged.mismatches == 2
    assert judge_replay([result], max_mismatch_share=0.2, min_positions=10).outcome is Outcome.PASS
    assert judge_replay([result], max_mismatch_share=0.2, min_positions=30).outcome is Outcome.UNKNOWN


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> TransformersReference:
    return TransformersReference.load("smollm2", smollm2_dir, threads=1)


async def seeded_answers(lm: LocalCausalLM, seed: int, max_tokens: int) -> list[SeededAnswer]:
    prompts = [lm.encode_prompt(p) for p in PROMPTS]
    seeds = [seed + i for i in range(len(prompts))]
    outs = lm.generate_seeded(prompts, max_tokens, seeds=seeds, temperature=TEMPERATURE)
    return [SeededAnswer(tuple(p), tuple(o), s, TEMPERATURE)
            for p, o, s in zip(prompts, outs, seeds, strict=True)]


@pytest.mark.parametrize("kind", ["int8", "half_layers"])
async def test_cheaper_models_sampling_with_the_same_noise_fail_the_replay(
    reference: TransformersReference, smollm2_dir: Path, kind: str
) -> None:
    transform = requantize_int8 if kind == "int8" else keep_every_other_layer
    max_tokens, fewest = LENGTHS[kind]
    cheap = LocalCausalLM(smollm2_dir, transform=transform)
    answers = await seeded_answers(cheap, 7000, max_tokens)
    judgement, results = await replay_and_judge(reference, answers)
    margins = sorted(m for r in results for m in (r.margins or ()) if m > 0)
    log.warning("seeded_replay kind=%s tokens=%d mismatches=%d share=%.4f margins=%s", kind,
                judgement.positions, judgement.mismatches, judgement.mismatch_share,
                [round(m, 3) for m in margins[:8]])
    assert judgement.positions >= fewest
    assert judgement.outcome is Outcome.FAIL, judgement.reason
    threshold = ReceiptSettings().replay_max_mismatch_share
    assert judgement.mismatch_share > 2 * threshold
    assert all(math.isfinite(m) and m > 0 for m in margins)
