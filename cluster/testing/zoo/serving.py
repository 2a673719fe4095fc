"""What each zoo node answers: from a validated request to a response body.

- :class:`ModelServing`: a transformers model (honest, or altered weights) behind
  ``/v1/completions`` (generation, ``echo`` + ``logprobs`` scoring as lm-eval asks it) and
  ``/v1/chat/completions``. Temperature-0 answers are cached by request, as a deterministic
  server may: the answer is the same either way, only the compute is saved (it makes a proxy
  in front of this node cheap in tests).
- :class:`LazyServing`: no model at all. Kind ``lazy`` replays cached answers (a fixed pool
  of plausible answers, picked by a hash of the prompt, with made-up logprobs); kind
  ``random`` answers random words. Both are instant, which is the point of being lazy.

A proxy is not a serving: it forwards bytes (:mod:`cluster.testing.zoo.server`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from cluster.honesty.local_lm import FinishReason, GeneratedTokens, LocalCausalLM, TokenChoice
from cluster.testing.testnode.protocol import ChatRequest, CompletionRequest
from cluster.testing.testnode.serving import ResponseIds
from cluster.wire import openai as wire

# answers kept per model (the cheater kinds reuse the honest model's: benches send a few
# hundred docs to several nodes)
CACHE_SIZE = 2048

_CANNED = (
    "I'm sorry, I can't help with that right now.",
    "The answer depends on many factors, but generally it is yes.",
    "Sure! Here is a short answer: it is 42.",
    "That is a great question. Let me think about it step by step.",
    "In summary, the main idea is to keep it simple.",
    "Yes, that is correct.",
    "There are many ways to do this, and each has trade-offs.",
    "Thank you for asking. The short answer is no.",
)
_WORDS = ("apple river stone cloud market window garden silver engine paper yellow quiet "
          "mountain letter bridge candle forest number orange table music winter doctor").split()


def _prompt_text(lm: LocalCausalLM | None, item: str | list[int]) -> str:
    if isinstance(item, str):
        return item
    return lm.decode(item) if lm is not None else " ".join(str(t) for t in item)


class AnswerCache:
    """Answers of temperature-0 requests by canonical request JSON (LRU, thread-safe), and
    the requests being computed now (``running``, used on the event loop only), so that
    identical concurrent requests are computed once."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.running: dict[str, asyncio.Future[dict[str, Any] | None]] = {}

    @staticmethod
    def key(path: str, payload: dict[str, Any]) -> str | None:
        # Greedy requests only; those differing only in their seed share one answer.
        key = wire.greedy_request_key(payload)
        return None if key is None else path + key

    def get(self, key: str | None) -> dict[str, Any] | None:
        if key is None or self._size <= 0:
            return None
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return json.loads(json.dumps(found)) if found is not None else None

    def put(self, key: str | None, answer: dict[str, Any] | None) -> None:
        if key is None or answer is None or self._size <= 0:
            return
        with self._lock:
            self._items[key] = json.loads(json.dumps(answer))
            while len(self._items) > self._size:
                self._items.popitem(last=False)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = wire.earliest_stop(text, stop)
    return (text[:cut], True) if cut >= 0 else (text, False)


def is_seeded(temperature: float, seed: int | None) -> bool:
    from cluster.honesty.seeded_sampling import MIN_TEMPERATURE

    return seed is not None and temperature >= MIN_TEMPERATURE


def seeded_tokens(lm: LocalCausalLM, prompts: Sequence[Sequence[int]], max_tokens: int,
                  temperature: float, seed: int | None) -> list[tuple[list[int], FinishReason]]:
    """Seeded sampling (``cluster/honesty/seeded_sampling.py``, what the LLM node does with
    ``seeded_sampling``): every prompt of a request with the request's seed; the
    end-of-sequence token ends an answer and is not kept."""
    drawn = lm.generate_seeded(prompts, max_tokens, seeds=[int(seed or 0)] * len(prompts),
                               temperature=temperature)
    out: list[tuple[list[int], FinishReason]] = []
    for ids in drawn:
        if lm.eos_id in ids:
            out.append((ids[:ids.index(lm.eos_id)], "stop"))
        else:
            out.append((list(ids), "length"))
    return out


def scored_tokens(lm: LocalCausalLM, prompts: Sequence[Sequence[int]],
                  drawn: Sequence[tuple[list[int], FinishReason]], top_k: int
                  ) -> list[GeneratedTokens]:
    """``drawn`` answers with the logprobs ``lm`` gives their tokens, teacher-forced."""
    scored = lm.score([list(p) + ids for p, (ids, _) in zip(prompts, drawn, strict=True)],
                      first=[len(p) for p in prompts], top_k=top_k)
    out = []
    for prompt, (ids, finish), seq in zip(prompts, drawn, scored, strict=True):
        positions = seq.positions[len(prompt):]
        tokens = tuple(p if p is not None else TokenChoice(t, 0.0, ())
                       for t, p in zip(ids, positions, strict=True))
        out.append(GeneratedTokens(tuple(prompt), tokens, finish))
    return out


class ModelServing:
    """OpenAI completions and chat over a :class:`LocalCausalLM` (blocking calls)."""

    def __init__(self, lm: LocalCausalLM, model_name: str, *, cache_size: int = CACHE_SIZE,
                 clock: Callable[[], float] = time.time) -> None:
        self.lm = lm
        self.model_name = model_name
        self._ids = ResponseIds(clock)
        self.cache = AnswerCache(cache_size)

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, *, top_k: int = 1,
                 temperature: float = 0.0, seed: int | None = None) -> list[GeneratedTokens]:
        """The generated tokens of every prompt with the logprobs reported for them (the
        model's own; a laundering cheater overrides this, ``cluster/testing/zoo/cheaters.py``).
        A sampled request with a seed is sampled as the LLM node samples it
        (:func:`seeded_tokens`)."""
        if is_seeded(temperature, seed):
            return scored_tokens(self.lm, prompts,
                                 seeded_tokens(self.lm, prompts, max_tokens, temperature, seed),
                                 top_k)
        return self.lm.generate(prompts, max_tokens, top_k=top_k, temperature=temperature,
                                seed=seed)

    def _top(self, choice: TokenChoice, k: int) -> dict[str, float]:
        top = {self.lm.token_text(t): lp for t, lp in choice.top[:k]}
        top.setdefault(self.lm.token_text(choice.token_id), choice.logprob)
        return top

    def complete(self, req: CompletionRequest) -> dict[str, Any]:
        lm = self.lm
        prompts = [lm.encode_prompt(p) if isinstance(p, str) else list(p) for p in req.prompt]
        k = req.logprobs
        scoring = req.echo and req.max_tokens <= 1
        if scoring:
            # lm-eval's loglikelihood request: one forward, the next token is the greedy one.
            scored = lm.score(prompts, top_k=max(1, k or 1))
            generated = [[s.next_token] if req.max_tokens == 1 else [] for s in scored]
            finishes = ["length"] * len(prompts)
        else:
            gens = self.generate(prompts, req.max_tokens, top_k=max(1, k or 1),
                                 temperature=req.temperature, seed=req.seed)
            generated = [list(g.tokens) for g in gens]
            finishes = [g.finish_reason for g in gens]
            scored = lm.score(prompts, top_k=max(1, k or 1)) if req.echo and k is not None \
                else None
        stop = wire.normalize_stop(req.stop)
        choices = []
        completion_tokens = 0
        for index, (item, ids, tokens) in enumerate(zip(req.prompt, prompts, generated,
                                                        strict=True)):
            text, stopped = _cut_at_stop(lm.decode([t.token_id for t in tokens]), stop)
            if stopped:
                kept: list[TokenChoice] = []
                for token in tokens:
                    if len(lm.decode([t.token_id for t in [*kept, token]])) > len(text):
                        break
                    kept.append(token)
                tokens, finishes[index] = kept, "stop"
            completion_tokens += len(tokens)
            prompt_text = _prompt_text(lm, item)
            logprobs = None
            if k is not None:
                names, lps, tops = [], [], []
                if req.echo and scored is not None:
                    for i, position in enumerate(scored[index].positions):
                        names.append(lm.token_text(ids[i]))
                        lps.append(None if position is None else position.logprob)
                        tops.append(None if position is None else self._top(position, k))
                for token in tokens:
                    names.append(lm.token_text(token.token_id))
                    lps.append(token.logprob)
                    tops.append(self._top(token, k))
                at = 0 if req.echo else len(prompt_text)
                offsets = []
                for name in names:
                    offsets.append(at)
                    at += len(name)
                logprobs = wire.completion_logprobs(names, lps, tops, offsets)
            out = prompt_text + text if req.echo else text
            choice = wire.completion_choice(index, out, finishes[index], logprobs)
            if getattr(req, wire.RETURN_TOKEN_IDS, False):  # vLLM's extra field
                choice[wire.TOKEN_IDS] = [t.token_id for t in tokens]
            choices.append(choice)
        return wire.completion_response(
            self._ids.new("cmpl"), self._ids.created(), self.model_name, choices,
            wire.usage(sum(len(p) for p in prompts), completion_tokens))

    def chat(self, req: ChatRequest) -> dict[str, Any]:
        lm = self.lm
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else ""}
                    for m in req.messages]
        prompt = lm.chat_prompt(messages)
        gen = self.generate([prompt], req.output_limit(), temperature=req.temperature,
                            seed=req.seed)[0]
        text, stopped = _cut_at_stop(lm.decode(gen.token_ids), wire.normalize_stop(req.stop))
        response = wire.chat_response(
            self._ids.new("chatcmpl"), self._ids.created(), self.model_name, text,
            "stop" if stopped else gen.finish_reason, wire.usage(len(prompt), len(gen.tokens)))
        if req.logprobs:
            wire.with_chat_logprobs(response, wire.chat_logprobs(
                [lm.token_text(t.token_id) for t in gen.tokens], [t.logprob for t in gen.tokens]))
        return response

    def models(self) -> dict[str, Any]:
        return wire.models_response(self.model_name, self._ids.created())


class LazyServing:
    """Answers without computing: cached canned answers (``lazy``) or random words."""

    def __init__(self, model_name: str, *, random_text: bool, seed: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.model_name = model_name
        self.random_text = random_text
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._ids = ResponseIds(clock)

    def _draw(self, key: str) -> random.Random:
        if self.random_text:
            with self._lock:
                return random.Random(self._rng.getrandbits(64))
        return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))

    def _answer(self, key: str, max_tokens: int) -> tuple[list[str], list[float]]:
        rng = self._draw(key)
        if self.random_text:
            words = [" " + rng.choice(_WORDS) for _ in range(max(0, max_tokens))]
        else:
            words = [" " + w for w in rng.choice(_CANNED).split()][:max(0, max_tokens)]
        return words, [round(-rng.uniform(0.05, 3.0), 4) for _ in words]

    def complete(self, req: CompletionRequest) -> dict[str, Any]:
        choices = []
        produced = 0
        for index, item in enumerate(req.prompt):
            text = _prompt_text(None, item)
            words, lps = self._answer(text, req.max_tokens)
            produced += len(words)
            logprobs = None
            if req.logprobs is not None:
                names, values = list(words), list(lps)
                if req.echo:
                    # Made-up scores for the prompt's tokens: as many as it was sent.
                    prompt_units = item if isinstance(item, list) else text.split()
                    rng = self._draw("echo" + text)
                    names = [str(u) for u in prompt_units] + names
                    made_up: list[float | None] = [None] + [
                        round(-rng.uniform(0.05, 6.0), 4) for _ in prompt_units[1:]]
                    values = made_up + values
                tops = [None if v is None else {n: v} for n, v in zip(names, values, strict=True)]
                logprobs = wire.completion_logprobs(names, values, tops, list(range(len(names))))
            out = "".join(words)
            choices.append(wire.completion_choice(index, text + out if req.echo else out,
                                                  "length", logprobs))
        return wire.completion_response(self._ids.new("cmpl"), self._ids.created(),
                                        self.model_name, choices, wire.usage(0, produced))

    def chat(self, req: ChatRequest) -> dict[str, Any]:
        key = json.dumps([m.model_dump() for m in req.messages], sort_keys=True)
        max_tokens = req.max_tokens if req.max_tokens is not None else 32
        words, lps = self._answer(key, max_tokens)
        response = wire.chat_response(self._ids.new("chatcmpl"), self._ids.created(),
                                      self.model_name, "".join(words).strip(), "stop",
                                      wire.usage(0, len(words)))
        if req.logprobs:
            wire.with_chat_logprobs(response, wire.chat_logprobs(words, lps))
        return response

    def models(self) -> dict[str, Any]:
        return wire.models_response(self.model_name, self._ids.created())
