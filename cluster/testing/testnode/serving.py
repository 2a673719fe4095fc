"""The test node's endpoint logic: from a validated request to a response body."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from cluster.testing.testnode.model import FakeModel, Generation, chat_prompt_text
from cluster.testing.testnode.protocol import ChatRequest, CompletionRequest
from cluster.wire import openai as wire

_PIECES = re.compile(r"\s*\S+|\s+")


class ResponseIds:
    """Response ids (``<prefix>-<n>``, counting from 1) and ``created`` times of one node."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counter = itertools.count(1)

    def new(self, prefix: str) -> str:
        return f"{prefix}-{next(self._counter)}"

    def created(self) -> int:
        return int(self._clock())


class NodeServing:
    """Completions and chat completions over a :class:`FakeModel`."""

    def __init__(
        self, model: FakeModel, model_name: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.model = model
        self.model_name = model_name
        self.ids = ResponseIds(clock)
        self._variants = itertools.count(1)

    def _variant(self, temperature: float, seed: int | None) -> int:
        """0 (greedy) at temperature 0; else the request's seed, or a fresh draw."""
        if temperature == 0:
            return 0
        return seed if seed is not None else next(self._variants) + (1 << 40)

    # -- completions --------------------------------------------------------------------

    def complete(self, req: CompletionRequest) -> dict[str, Any]:
        model = self.model
        stop = wire.normalize_stop(req.stop)
        variant = self._variant(req.temperature, req.seed)
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        for index, item in enumerate(req.prompt):
            if isinstance(item, str):
                text, ids = item, model.encode(item)
            else:
                text, ids = model.decode(item), item
            gen = model.generate(text, req.max_tokens, stop, variant)
            prompt_tokens += len(ids)
            completion_tokens += len(gen.token_ids)
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._logprobs(ids, text, gen, req.logprobs, req.echo, req.temperature)
            out_text = text + gen.text if req.echo else gen.text
            choices.append(wire.completion_choice(index, out_text, gen.finish_reason, logprobs))
        return wire.completion_response(
            self.ids.new("cmpl"),
            self.ids.created(),
            self.model_name,
            choices,
            wire.usage(prompt_tokens, completion_tokens),
        )

    def _logprobs(
        self,
        ids: list[int],
        text: str,
        gen: Generation,
        k: int,
        echo: bool,
        temperature: float,
    ) -> dict[str, Any]:
        model = self.model
        seq = ids + gen.token_ids
        n_prompt = len(ids)
        greedy_from = n_prompt if temperature == 0 else None
        first = 1 if echo else n_prompt
        lps, tops = model.score(seq, k, first=first, greedy_from=greedy_from)
        token_text = model.codec.token_text
        tokens = [token_text(t) for t in seq]
        offsets: list[int] = []
        at = 0
        for name in tokens:
            offsets.append(at)
            at += len(name)
        if not echo:
            shift = len(text) - (offsets[n_prompt] if n_prompt < len(offsets) else at)
            start = n_prompt
            tokens, lps, tops = tokens[start:], lps[start:], tops[start:]
            offsets = [o + shift for o in offsets[start:]]
        return wire.completion_logprobs(tokens, lps, tops, offsets)

    def complete_stream(self, req: CompletionRequest) -> Iterator[dict[str, Any]]:
        body = self.complete(req.model_copy(update={"stream": False, "logprobs": None}))
        yield from wire.completion_chunks(body, _PIECES.findall)

    # -- chat ---------------------------------------------------------------------------

    def _chat_generation(self, req: ChatRequest) -> tuple[Generation, int]:
        text = chat_prompt_text([m.model_dump() for m in req.messages])
        variant = self._variant(req.temperature, req.seed)
        gen = self.model.generate(text, req.output_limit(), wire.normalize_stop(req.stop), variant)
        return gen, len(self.model.encode(text))

    def chat(self, req: ChatRequest) -> dict[str, Any]:
        gen, prompt_tokens = self._chat_generation(req)
        return wire.chat_response(
            self.ids.new("chatcmpl"),
            self.ids.created(),
            self.model_name,
            gen.text,
            gen.finish_reason,
            wire.usage(prompt_tokens, len(gen.token_ids)),
        )

    def chat_stream(self, req: ChatRequest) -> Iterator[dict[str, Any]]:
        gen, _ = self._chat_generation(req)
        rid, created = self.ids.new("chatcmpl"), self.ids.created()
        yield wire.chat_chunk(rid, created, self.model_name, wire.role_delta(), None)
        for piece in _PIECES.findall(gen.text):
            yield wire.chat_chunk(rid, created, self.model_name, wire.content_delta(piece), None)
        yield wire.chat_chunk(rid, created, self.model_name, {}, gen.finish_reason)

    def models(self) -> dict[str, Any]:
        return wire.models_response(self.model_name, self.ids.created())
