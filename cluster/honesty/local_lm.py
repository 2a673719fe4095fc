"""A causal LM run in this process with transformers (float32, CPU): greedy generation and
teacher-forced scoring, batched.

Two users: the in-process trusted reference (:mod:`cluster.honesty.reference`) and the
cheater zoo's nodes (:mod:`cluster.testing.zoo`), which load the same weights and then
alter them (:mod:`cluster.testing.weights`). Everything is deterministic for a given batch:
float32, a fixed number of torch threads, greedy decoding (sampling only with an explicit
seed). Batches are left-padded for generation and right-padded for scoring; padding changes
the float arithmetic slightly (other matmul shapes), as a different serving engine would,
so callers must not expect bit equality between a batched and an unbatched run.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenChoice:
    """One token position: the chosen token's logprob and the top alternatives there."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), best first

    @property
    def top_logprob(self) -> float:
        return self.top[0][1] if self.top else self.logprob


@dataclass(frozen=True)
class GeneratedTokens:
    """A generated continuation: its tokens (EOS excluded) with their logprobs."""

    prompt_ids: tuple[int, ...]
    tokens: tuple[TokenChoice, ...]
    finish_reason: FinishReason

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]


@dataclass(frozen=True)
class ScoredSequence:
    """Teacher-forced logprobs of a whole sequence: position ``i`` scores token ``i``
    given tokens ``< i`` (position 0 has no score), plus the greedy next token."""

    token_ids: tuple[int, ...]
    positions: tuple[TokenChoice | None, ...]
    next_token: TokenChoice


def _top(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    values, ids = torch.topk(logprobs, max(1, k))
    return tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))


class LocalCausalLM:
    """A Hugging Face causal LM directory loaded in float32, with its tokenizer.

    ``transform`` alters the weights once after loading (the zoo's cheaters); calls are
    serialised by a lock, so one instance may serve several threads.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        transform: Callable[[PreTrainedModel], None] | None = None,
        threads: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        if threads is not None:
            # One process-wide setting: the caller picks it once (tests use 1 on a shared box).
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        model.eval()
        if transform is not None:
            with torch.no_grad():
                transform(model)
        self.model = model
        eos = self.tokenizer.eos_token_id
        self.eos_id: int = int(eos if eos is not None else model.config.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = int(pad if pad is not None else self.eos_id)
        self._lock = threading.Lock()
        log.info("local_lm.loaded dir=%s transformed=%s", self.model_dir, transform is not None)

    # -- tokens -------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a text prompt as an OpenAI completions server feeds them to the
        model (vLLM: the tokenizer's own special tokens, e.g. a BOS where it adds one)."""
        return list(self.tokenizer.encode(text))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (a continuation)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        """One token as text (the OpenAI ``tokens`` / ``top_logprobs`` keys)."""
        return str(self.tokenizer.decode([int(token_id)]))

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return self.encode(str(text))  # the template spells its special tokens itself

    # -- compute ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        *,
        top_k: int = 1,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[GeneratedTokens]:
        """Continue every prompt by up to ``max_tokens`` tokens (greedy at temperature 0)."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_tokens <= 0:
            return [GeneratedTokens(tuple(p), (), "length") for p in prompts]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        sample = temperature > 0
        with self._lock, torch.inference_mode():
            if sample:
                torch.manual_seed(0 if seed is None else int(seed))
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=int(max_tokens),
                do_sample=sample,
                temperature=float(temperature) if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[:, width:]
        steps = [torch.log_softmax(logits.float(), dim=-1) for logits in out.logits]
        results: list[GeneratedTokens] = []
        for row, prompt in enumerate(prompts):
            tokens: list[TokenChoice] = []
            finish: FinishReason = "length"
            for step in range(new.shape[1]):
                token = int(new[row, step])
                if token == self.eos_id:
                    finish = "stop"
                    break
                lp = steps[step][row]
                tokens.append(TokenChoice(token, float(lp[token]), _top(lp, top_k)))
            results.append(GeneratedTokens(tuple(prompt), tuple(tokens), finish))
        return results

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        first: Sequence[int] | None = None,
        top_k: int = 1,
    ) -> list[ScoredSequence]:
        """Teacher-forced logprobs of the tokens of every sequence (one batched forward).

        Only positions ``>= first[row]`` (default 1: all) are scored, and the LM head runs
        only over the last positions any row needs: on a long prompt with a short
        continuation that is most of the cost saved.
        """
        if not sequences:
            return []
        if any(len(s) == 0 for s in sequences):
            raise ValueError("every sequence needs at least one token")
        starts = [1] * len(sequences) if first is None else [max(1, int(f)) for f in first]
        width = max(len(s) for s in sequences)
        # Left padding puts every row's end at the same column, so one ``logits_to_keep``
        # covers all scored positions; explicit position ids keep each row's positions as if
        # unpadded (the model does not derive them from the mask outside ``generate``).
        keep = max(len(s) - st + 1 for s, st in zip(sequences, starts, strict=True))
        keep = max(1, min(width, keep))
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # column c = predicts c + 1
        offset = width - keep  # logits column j holds input column offset + j
        results: list[ScoredSequence] = []
        for row, seq in enumerate(sequences):
            pad = width - len(seq)
            scored: list[TokenChoice | None] = []
            for i in range(len(seq)):
                column = pad + i - 1 - offset  # the logits that predict token i
                if i < starts[row] or column < 0:
                    scored.append(None)
                    continue
                lp = logprobs[row, column]
                scored.append(TokenChoice(int(seq[i]), float(lp[seq[i]]), _top(lp, top_k)))
            last = logprobs[row, keep - 1]
            best = int(torch.argmax(last))
            next_token = TokenChoice(best, float(last[best]), _top(last, top_k))
            results.append(ScoredSequence(tuple(seq), tuple(scored), next_token))
        return results

    def teacher_forced_logits(self, prompt: Sequence[int], continuation: Sequence[int]
                              ) -> torch.Tensor:
        """Logits ``[len(continuation), V]`` (float32): row ``i`` predicts ``continuation[i]``
        from ``prompt + continuation[:i]`` (one unbatched forward, no padding)."""
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if not continuation:
            return torch.empty(0, 0)
        ids = torch.tensor([list(prompt) + list(continuation)], dtype=torch.long)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, logits_to_keep=len(continuation) + 1).logits
        return logits[0, : len(continuation)].float()

    def generate_seeded(self, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                        seeds: Sequence[int], temperature: float) -> list[list[int]]:
        """Seeded sampling (:mod:`cluster.honesty.seeded_sampling`) of up to ``max_tokens``
        tokens per prompt, batched; an answer keeps its end-of-sequence token when it picks
        one (as vLLM reports token ids)."""
        from transformers import LogitsProcessor, LogitsProcessorList

        from cluster.honesty.seeded_sampling import seeded_pick

        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if not prompts or max_tokens <= 0:
            return [[] for _ in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        pads = [width - len(p) for p in prompts]

        class SeededPicks(LogitsProcessor):
            """Leaves only the seeded pick of each row; greedy decoding then takes it."""

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                out = torch.full_like(scores, -math.inf)
                for row in range(scores.shape[0]):
                    position = input_ids.shape[1] - pads[row]  # the row's unpadded length
                    out[row, seeded_pick(scores[row], seeds[row], position, temperature)] = 0.0
                return out

        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, pads[row]:] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, pads[row]:] = 1
        with self._lock, torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=int(max_tokens),
                do_sample=False, temperature=None, top_p=None, top_k=None,
                logits_processor=LogitsProcessorList([SeededPicks()]),
                pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        answers: list[list[int]] = []
        for row in out[:, width:].tolist():
            tokens: list[int] = []
            for token in row:
                tokens.append(int(token))
                if token == self.eos_id:
                    break
            answers.append(tokens)
        return answers
