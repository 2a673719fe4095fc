"""Seeded sampling on the LLM node: a vLLM logits processor any validator can replay.

With ``seeded_sampling: true`` in the node's config (``serve_apps/llm/config.py``), every
request that asks for a temperature above 0 **and** gives a ``seed`` is sampled by the
Gumbel-max trick with the public, hash-derived noise of
:mod:`cluster.honesty.seeded_sampling`: at each step the processor computes
``argmax(logits / T + g(seed, position, token))`` and leaves only that token standing, so
vLLM's own sampler can pick nothing else. The logprobs the node reports are unchanged
(vLLM computes them from the raw logits before any processor runs). Requests without a
seed, or at temperature 0, are untouched.

Why a logits processor: vLLM 0.32's V1 engine takes custom processor classes as an engine
argument (``logits_processors``) and gives each a request's sampling params, prompt token
ids and running output token ids, which is everything the noise needs (the absolute
position is ``len(prompt) + len(output)``); the sampler runs processors that may change
the argmax before temperature and sampling, so the pick survives both. No fork of vLLM's
sampler, and the OpenAI ``seed`` field is the public seed.

A replay repeats temperature only, so seeded requests that would reshape the distribution
(top-p, top-k, min-p, penalties, logit bias, allowed or bad words, a minimum length) are
refused with HTTP 400.
"""

from __future__ import annotations

import math

import torch

from cluster.honesty.seeded_sampling import MIN_TEMPERATURE, seeded_pick
from serve_apps.llm.vllm_compat import (
    AdapterLogitsProcessor,
    RequestLogitsProcessor,
    SamplingParams,
)


def is_seeded(params: SamplingParams) -> bool:
    """Whether a request is sampled with the replayable noise."""
    return params.seed is not None and params.temperature >= MIN_TEMPERATURE


def unreplayable_options(params: SamplingParams) -> list[str]:
    """The sampling options of a request that a replay could not repeat."""
    found = []
    if params.top_p < 1.0:
        found.append("top_p")
    if params.top_k not in (0, -1, None):
        found.append("top_k")
    if params.min_p > 0.0:
        found.append("min_p")
    if params.repetition_penalty != 1.0:
        found.append("repetition_penalty")
    if params.presence_penalty != 0.0:
        found.append("presence_penalty")
    if params.frequency_penalty != 0.0:
        found.append("frequency_penalty")
    if params.logit_bias:
        found.append("logit_bias")
    if params.allowed_token_ids:
        found.append("allowed_token_ids")
    if params.bad_words:
        found.append("bad_words")
    if params.min_tokens:
        found.append("min_tokens")
    return found


class SeededSampling(AdapterLogitsProcessor):
    """Per request with a seed and a temperature > 0: leave only the seeded pick."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if not is_seeded(sampling_params):
            return
        refused = unreplayable_options(sampling_params)
        if refused:
            raise ValueError(
                f"this node samples seeded requests (temperature > 0 and a seed) so that "
                f"they can be replayed, which repeats temperature only: unset {refused}")

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        if not is_seeded(params):
            return None
        seed, temperature = int(params.seed or 0), float(params.temperature)

        def pick_only(prompt_ids: list[int], output_ids: list[int],
                      logits: torch.Tensor) -> torch.Tensor:
            token = seeded_pick(logits, seed, len(prompt_ids) + len(output_ids), temperature)
            only = torch.full_like(logits, -math.inf)
            only[token] = 0.0
            return only

        return pick_only
