"""The trusted reference of a claimed model: what the honesty checks compare nodes with.

One small interface, :class:`TrustedReference`, two implementations:

- :class:`ServeReference` (production): testbench's own Serve LLM app
  (``serve_apps/llm``, vLLM) running the claimed model, reached by URL. Generation is a
  temperature-0 ``/v1/completions`` call; logprobs are lm-eval's echo request (token ids,
  ``echo``, ``logprobs=1``); the expected signatures are its own ``/signature/...`` routes.
- :class:`TransformersReference` (CPU tests, small models): the model loaded in this
  process with transformers in float32 (:class:`~cluster.honesty.local_lm.LocalCausalLM`),
  teacher-forced and greedy, deterministic. The expected signatures are the digests of its
  model directory, computed exactly as the Serve app's signature routes compute them.

Generated token ids are the reference tokenizer's encoding of the answer text: the same
rule is applied to a node's answers, so both sides are compared in one token space even
when a server does not report token ids.

Seeded sampled answers (``cluster/honesty/seeded_sampling.py``) are replayed on their
committed token ids (``replay_seeded``): the in-process reference runs one teacher-forced
forward per answer and recomputes every pick, with margins; the Serve reference, which has
no full logits to give, replays teacher-forced by segments: it samples with the same seed
from prompt + the answer's first ``i`` tokens (the noise's position is absolute, so a
continuation sees the same noise), finds where its own tokens part from the answer's,
counts that position and continues after it with the answer's token. A request samples at
most ``REPLAY_SEGMENT_TOKENS`` tokens (what follows a mismatch is sampled again anyway, so
longer segments would waste decoding on a cheater's answers), at most
``MAX_REPLAY_REQUESTS`` per answer (a replay cut short judges the positions it reached).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import aiohttp

from cluster.core.errors import TestbenchError
from cluster.nodes.transport import NodeEndpoint, NodeTransport, NodeUnavailable
from cluster.wire import openai as wire

if TYPE_CHECKING:  # torch is imported only where a model runs in process
    from cluster.honesty.local_lm import LocalCausalLM
    from cluster.honesty.seeded_sampling import ReplayResult, SeededAnswer

log = logging.getLogger(__name__)

REPLAY_SEGMENT_TOKENS = 32
MAX_REPLAY_REQUESTS = 256  # per answer (Serve reference)


class ReferenceUnavailable(TestbenchError):
    """The reference could not answer: a bench-side failure, never blamed on a node."""


@dataclass(frozen=True)
class TokenScore:
    """A token's logprob under the reference and the best logprob at its position."""

    logprob: float
    top_logprob: float

    @property
    def regret(self) -> float:
        """How far below the reference's greedy choice the token is (0 = greedy)."""
        return max(0.0, self.top_logprob - self.logprob)


@dataclass(frozen=True)
class ReferenceAnswer:
    """The reference's greedy answer to one text prompt, with its own logprobs."""

    prompt: str
    prompt_ids: tuple[int, ...]
    text: str
    token_ids: tuple[int, ...]
    scores: tuple[TokenScore, ...]  # one per token id: the baseline of the echo comparison


def align_token_ids(text: str, tokens: Sequence[str] | None,
                    encode: Callable[[str], list[int]]) -> tuple[list[int], bool]:
    """Token ids of a generated ``text``, and whether they are the generator's own.

    Servers report generated tokens as strings, not ids. When those strings spell the text
    and each is one token of the tokenizer, they are the generated ids; otherwise (bytes of
    a split character, another tokenizer) the text is re-encoded, which may split it
    differently from how it was generated (then the ids are not the generator's own).
    """
    if tokens is not None and "".join(tokens) == text:
        ids: list[int] = []
        for token in tokens:
            one = encode(token)
            if len(one) != 1:
                break
            ids.append(one[0])
        else:
            return ids, True
    return encode(text), False


@dataclass(frozen=True)
class ExpectedSignatures:
    """The combined sha256 digests an honest node of the model reports (None: unknown)."""

    tokenizer_sha256: str | None
    config_sha256: str | None


class TrustedReference(Protocol):
    """What the checks need from a reference deployment of the claimed model."""

    model: str

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids a completions server feeds the model for this text prompt."""
        ...

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of generated text (no special tokens)."""
        ...

    async def generate(self, prompts: Sequence[str], max_tokens: int) -> list[ReferenceAnswer]:
        """Greedy (temperature 0) answers of up to ``max_tokens`` tokens, in prompt order."""
        ...

    async def generate_ids(self, prompts: Sequence[Sequence[int]], max_tokens: int
                           ) -> list[ReferenceAnswer]:
        """As :meth:`generate`, for prompts given as token ids (what lm-eval sends)."""
        ...

    async def logprobs(
        self, items: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[list[TokenScore]]:
        """Teacher-forced scores of each ``continuation`` after its ``prompt`` (token ids)."""
        ...

    async def signatures(self) -> ExpectedSignatures: ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of generated token ids (special tokens dropped, as servers answer)."""
        ...

    async def replay_seeded(self, answers: Sequence[SeededAnswer]) -> list[ReplayResult]:
        """Teacher-forced replay of seeded sampled answers on their committed token ids."""
        ...


def directory_signatures(model_dir: Path) -> ExpectedSignatures:
    """The digests the LLM node's ``/signature/...`` routes report for ``model_dir``."""
    from cluster.modeldir.signatures import (
        CONFIG_FILES,
        TOKENIZER_FILES,
        combined_sha256,
        digest_files,
    )

    tokenizer = digest_files(model_dir, TOKENIZER_FILES)
    config = digest_files(model_dir, CONFIG_FILES)
    return ExpectedSignatures(
        tokenizer_sha256=combined_sha256(tokenizer) if tokenizer else None,
        config_sha256=combined_sha256(config) if config else None,
    )


class TransformersReference:
    """The claimed model in this process (float32, CPU); compute runs in a worker thread."""

    def __init__(self, model: str, lm: LocalCausalLM) -> None:
        self.model = model
        self.lm = lm

    @classmethod
    def load(cls, model: str, model_dir: str | Path, threads: int | None = None
             ) -> TransformersReference:
        from cluster.honesty.local_lm import LocalCausalLM

        return cls(model, LocalCausalLM(model_dir, threads=threads))

    def encode_prompt(self, text: str) -> list[int]:
        return self.lm.encode_prompt(text)

    def encode_continuation(self, text: str) -> list[int]:
        return self.lm.encode(text)

    async def generate(self, prompts: Sequence[str], max_tokens: int) -> list[ReferenceAnswer]:
        return await self._generate(list(prompts), [self.encode_prompt(p) for p in prompts],
                                    max_tokens)

    async def generate_ids(self, prompts: Sequence[Sequence[int]], max_tokens: int
                           ) -> list[ReferenceAnswer]:
        ids = [list(p) for p in prompts]
        return await self._generate([self.lm.decode(p) for p in ids], ids, max_tokens)

    async def _generate(self, texts: list[str], ids: list[list[int]], max_tokens: int
                        ) -> list[ReferenceAnswer]:
        generated = await asyncio.to_thread(self.lm.generate, ids, max_tokens)
        return [ReferenceAnswer(prompt, gen.prompt_ids, self.lm.decode(gen.token_ids),
                                tuple(gen.token_ids),
                                tuple(TokenScore(t.logprob, t.top_logprob) for t in gen.tokens))
                for prompt, gen in zip(texts, generated, strict=True)]

    async def logprobs(
        self, items: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[list[TokenScore]]:
        # Identical (prompt, continuation) pairs are scored once: honest nodes and proxies
        # mostly return the reference's own tokens, so most of a round's work is shared.
        keys = [(tuple(p), tuple(c)) for p, c in items]
        unique = list(dict.fromkeys(k for k in keys if k[1]))
        scored = await asyncio.to_thread(
            self.lm.score, [list(p + c) for p, c in unique], first=[len(p) for p, _ in unique])
        by_key: dict[tuple[tuple[int, ...], tuple[int, ...]], list[TokenScore]] = {}
        for (prompt, cont), seq in zip(unique, scored, strict=True):
            positions = seq.positions[len(prompt):len(prompt) + len(cont)]
            by_key[(prompt, cont)] = [TokenScore(p.logprob, p.top_logprob)
                                      for p in positions if p is not None]
        return [list(by_key.get(k, [])) for k in keys]

    async def signatures(self) -> ExpectedSignatures:
        return directory_signatures(self.lm.model_dir)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.lm.decode(token_ids)

    async def replay_seeded(self, answers: Sequence[SeededAnswer]) -> list[ReplayResult]:
        from cluster.honesty.seeded_sampling import replay_from_logits

        def replay_all() -> list[ReplayResult]:
            return [replay_from_logits(
                self.lm.teacher_forced_logits(a.prompt_ids, a.token_ids), a) for a in answers]

        return await asyncio.to_thread(replay_all)


class ServeReference:
    """testbench's own Serve LLM app for the claimed model, reached over HTTP."""

    def __init__(
        self,
        model: str,
        base_url: str,
        tokenizer_dir: str | Path,
        http: aiohttp.ClientSession,
        *,
        seed: int,
        timeout_s: float = 300.0,
        served_model: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.model = model
        self._served = served_model or model  # the app may serve the model under another name
        self._client = NodeEndpoint(base_url, NodeTransport(http), timeout_s)
        self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self._seed = seed

    @property
    def base_url(self) -> str:
        return self._client.base_url

    @property
    def served_model(self) -> str:
        return self._served

    def encode_prompt(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def encode_continuation(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    async def _post(self, body: dict[str, object], n: int) -> list[wire.CompletionChoice]:
        try:
            answer, _ = await self._client.post_json(wire.COMPLETIONS_PATH, body)
            return wire.parse_completion(answer, n)
        except (NodeUnavailable, wire.MalformedAnswer) as exc:
            raise ReferenceUnavailable(f"reference {self._client.base_url}: {exc}") from exc

    async def generate(self, prompts: Sequence[str], max_tokens: int) -> list[ReferenceAnswer]:
        return await self._generate(list(prompts), [self.encode_prompt(p) for p in prompts],
                                    list(prompts), max_tokens)

    async def generate_ids(self, prompts: Sequence[Sequence[int]], max_tokens: int
                           ) -> list[ReferenceAnswer]:
        ids = [[int(t) for t in p] for p in prompts]
        texts = [str(self._tokenizer.decode(p)) for p in ids]
        return await self._generate(texts, ids, list(ids), max_tokens)

    async def _generate(self, prompts: list[str], prompt_ids_of: list[list[int]],
                        sent: list[str] | list[list[int]], max_tokens: int
                        ) -> list[ReferenceAnswer]:
        if not prompts:
            return []
        body = wire.completion_body(self._served, sent, max_tokens, seed=self._seed, logprobs=1)
        choices = await self._post(body, len(prompts))
        answers: list[ReferenceAnswer | None] = []
        rescore: list[tuple[int, list[int], list[int]]] = []
        for i, (prompt, choice) in enumerate(zip(prompts, choices, strict=True)):
            prompt_ids = prompt_ids_of[i]
            ids, own = align_token_ids(choice.text, choice.tokens, self.encode_continuation)
            lps, tops = choice.token_logprobs, choice.top_logprobs
            if own and lps is not None and len(lps) == len(ids) and None not in lps:
                best = tops if tops is not None else (None,) * len(lps)
                scores = tuple(TokenScore(lp, lp if top is None else max(lp, top))
                               for lp, top in zip((float(x or 0.0) for x in lps), best,
                                                  strict=True))
                answers.append(ReferenceAnswer(prompt, tuple(prompt_ids), choice.text,
                                               tuple(ids), scores))
            else:
                answers.append(None)
                rescore.append((i, prompt_ids, ids))
        if rescore:  # re-encoded answers: score the ids they now have
            scored = await self.logprobs([(p, c) for _, p, c in rescore])
            for (i, prompt_ids, ids), scores_ in zip(rescore, scored, strict=True):
                answers[i] = ReferenceAnswer(prompts[i], tuple(prompt_ids), choices[i].text,
                                             tuple(ids), tuple(scores_))
        return [a for a in answers if a is not None]

    async def logprobs(
        self, items: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[list[TokenScore]]:
        todo = [(list(p), list(c)) for p, c in items]
        asked = [p + c for p, c in todo if c]
        if not asked:
            return [[] for _ in todo]
        body = wire.completion_body(self._served, asked, 1, seed=self._seed, logprobs=1, echo=True)
        choices = iter(await self._post(body, len(asked)))
        out: list[list[TokenScore]] = []
        for prompt, cont in todo:
            if not cont:
                out.append([])
                continue
            choice = next(choices)
            lps, tops = choice.token_logprobs, choice.top_logprobs
            if lps is None or len(lps) < len(prompt) + len(cont):
                raise ReferenceUnavailable("reference echoed fewer logprobs than tokens sent")
            scores = []
            for i in range(len(prompt), len(prompt) + len(cont)):
                lp = lps[i]
                if lp is None:
                    raise ReferenceUnavailable(f"reference gave no logprob at position {i}")
                top = tops[i] if tops is not None and tops[i] is not None else lp
                scores.append(TokenScore(lp, max(lp, top)))
            out.append(scores)
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    async def replay_seeded(self, answers: Sequence[SeededAnswer]) -> list[ReplayResult]:
        return [await self._replay_one(a) for a in answers]

    async def _replay_one(self, answer: SeededAnswer) -> ReplayResult:
        from cluster.honesty.seeded_sampling import ReplayResult

        ids, prompt = list(answer.token_ids), list(answer.prompt_ids)
        mismatch_at: list[int] = []
        done = 0  # positions of the answer judged so far
        for _ in range(MAX_REPLAY_REQUESTS):
            if done >= len(ids):
                break
            body = wire.seeded_completion_body(
                self._served, prompt + ids[:done], min(len(ids) - done, REPLAY_SEGMENT_TOKENS),
                seed=answer.seed, temperature=answer.temperature)
            try:
                picked = wire.choice_token_ids((await self._client.post_json(
                    wire.COMPLETIONS_PATH, body))[0])
            except (NodeUnavailable, wire.MalformedAnswer) as exc:
                raise ReferenceUnavailable(f"reference {self._client.base_url}: {exc}") from exc
            if not picked:
                raise ReferenceUnavailable("reference sampled no token for a replay")
            agree = 0
            while agree < len(picked) and done + agree < len(ids) and picked[agree] == ids[done + agree]:
                agree += 1
            done += agree
            if done < len(ids) and agree < len(picked):  # parted here: count it, go on after it
                mismatch_at.append(done)
                done += 1
        return ReplayResult(positions=done, mismatches=len(mismatch_at),
                            first_mismatch=mismatch_at[0] if mismatch_at else None, margins=None,
                            mismatch_at=tuple(mismatch_at))

    async def signatures(self) -> ExpectedSignatures:
        found: list[str | None] = []
        for path in (wire.TOKENIZER_SIGNATURE_PATH, wire.CONFIG_SIGNATURE_PATH):
            try:
                found.append(wire.signature_sha256(await self._client.get_json(path)))
            except (NodeUnavailable, wire.MalformedAnswer) as exc:
                log.warning("honesty.reference_signature_missing path=%s error=%s", path, exc)
                found.append(None)
        return ExpectedSignatures(found[0], found[1])
