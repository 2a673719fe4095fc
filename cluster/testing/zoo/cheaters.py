"""Cheaters that are honest some of the time: each request is answered either by the claimed
model or by a cheaper one (:func:`cluster.testing.weights.drop_layers`: every other decoder
layer of SmolLM2 removed), and only the choice differs between kinds.

| kind | answers with the claimed model | answers with the cheaper model |
|---|---|---|
| ``launderer`` | echo scoring, and the logprobs it reports for generated tokens (teacher-forced through the claimed model) | every generated token |
| ``probe_aware`` | anything shaped like a verification round: a batched temperature-0 body of text prompts asking for logprobs, and an echo body with that body's seed | everything else |
| ``temperature_aware`` | temperature 0 | temperature > 0 (OpenAI's default temperature is 1) |
| ``sometimes`` | a share 1 - q of requests (seeded draw per request) | a share q |

The launderer is the published attack on logprob checks: a validator that compares the
logprobs a node reports with the claimed model's sees the claimed model's numbers, since
the node computed them with it; only the *tokens* are the cheaper model's.

Their claimed-model answers come from the zoo's honest serving when the zoo has one (its
answer cache is shared: no second compute), with a seeded jitter of at most
:data:`JITTER_NATS` added to every logprob they report: the last-bit differences two
independent deployments of one model have. Without it, answers computed by the very load
that serves the zoo's honest node would be bit-identical to that node's, and the identity
check would rightly call them a proxy of it; the jitter is a thousand times below the
substitution threshold.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from cluster.honesty.local_lm import GeneratedTokens, LocalCausalLM
from cluster.testing.zoo.serving import (
    AnswerCache,
    ModelServing,
    is_seeded,
    scored_tokens,
    seeded_tokens,
)
from cluster.wire import openai as wire

CheaterKind = Literal["launderer", "probe_aware", "temperature_aware", "sometimes"]
CHEATER_KINDS: tuple[CheaterKind, ...] = ("launderer", "probe_aware", "temperature_aware",
                                          "sometimes")
DEFAULT_CHEAT_SHARE = 0.1
JITTER_NATS = 2e-6
# A verification round's generation body: a prompt list of texts (``completion_body``)
PROBE_BATCH_MIN = 2
PROBE_SEEDS_KEPT = 64

Route = Literal["claimed", "cheaper", "laundered"]


class LaunderingServing(ModelServing):
    """Generates with the cheaper model and reports, for every generated token, the logprob
    (and top alternatives) the claimed model gives it, teacher-forced; echo scoring is the
    claimed model's (it is ``lm``)."""

    def __init__(self, claimed: LocalCausalLM, cheaper: LocalCausalLM, model_name: str) -> None:
        super().__init__(claimed, model_name)
        self.cheaper = cheaper

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, *, top_k: int = 1,
                 temperature: float = 0.0, seed: int | None = None) -> list[GeneratedTokens]:
        if is_seeded(temperature, seed):
            drawn = seeded_tokens(self.cheaper, prompts, max_tokens, temperature, seed)
        else:
            drawn = [(g.token_ids, g.finish_reason)
                     for g in self.cheaper.generate(prompts, max_tokens)]
        # the cheaper model's tokens, with the claimed model's logprobs (teacher-forced)
        return scored_tokens(self.lm, prompts, drawn, top_k)


def is_probe_generation(payload: Mapping[str, Any]) -> bool:
    """A verification round's generation request as ``cluster/honesty/verification.py``
    sends it: several text prompts in one temperature-0 body that asks for logprobs."""
    prompt = payload.get("prompt")
    return (isinstance(prompt, list) and len(prompt) >= PROBE_BATCH_MIN
            and all(isinstance(p, str) for p in prompt)
            and payload.get("temperature", 1.0) == 0 and payload.get("logprobs") is not None
            and not payload.get("echo"))


class RouteChooser:
    """Which serving answers a request, by kind (see the module's table)."""

    def __init__(self, kind: CheaterKind, *, share: float = DEFAULT_CHEAT_SHARE,
                 seed: int = 0) -> None:
        if kind not in CHEATER_KINDS:
            raise ValueError(f"unknown cheater kind {kind!r}; one of {CHEATER_KINDS}")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"cheat share must be in [0, 1], got {share}")
        self.kind = kind
        self.share = share
        self._rng = random.Random(f"sometimes|{seed}")
        self._probe_seeds: deque[Any] = deque(maxlen=PROBE_SEEDS_KEPT)
        self._lock = threading.Lock()

    def choose(self, path: str, payload: Mapping[str, Any]) -> Route:
        if self.kind == "launderer":
            scoring = bool(payload.get("echo")) and int(payload.get("max_tokens", 16) or 0) <= 1
            return "claimed" if path == wire.COMPLETIONS_PATH and scoring else "laundered"
        if self.kind == "temperature_aware":
            return "claimed" if payload.get("temperature", 1.0) == 0 else "cheaper"
        if self.kind == "probe_aware":
            with self._lock:
                if path == wire.COMPLETIONS_PATH and is_probe_generation(payload):
                    self._probe_seeds.append(payload.get("seed"))
                    return "claimed"
                if (path == wire.COMPLETIONS_PATH and payload.get("echo")
                        and payload.get("seed") in self._probe_seeds):
                    return "claimed"
            return "cheaper"
        with self._lock:
            return "cheaper" if self._rng.random() < self.share else "claimed"


class RoutedServing:
    """A zoo node answering each request with one of several servings (:class:`RouteChooser`);
    answers of the claimed model get the deployment jitter (module docstring)."""

    def __init__(self, name: str, chooser: RouteChooser, routes: Mapping[Route, ModelServing],
                 model_name: str) -> None:
        self.name = name
        self.chooser = chooser
        self.routes = dict(routes)
        self.model_name = model_name
        self.by_route: dict[str, int] = {}
        self._lock = threading.Lock()
        # answers are cached by the serving of their route, never for the node as a whole
        self.cache = AnswerCache(0)

    def route(self, path: str, payload: Mapping[str, Any]) -> tuple[Route, ModelServing]:
        chosen = self.chooser.choose(path, payload)
        with self._lock:
            self.by_route[chosen] = self.by_route.get(chosen, 0) + 1
        return chosen, self.routes[chosen]

    def finish(self, chosen: Route, payload: Mapping[str, Any], answer: dict[str, Any]
               ) -> dict[str, Any]:
        if chosen != "claimed":
            return answer
        key = json.dumps({k: v for k, v in payload.items() if k != "seed"}, sort_keys=True)
        digest = hashlib.sha256(f"{self.name}|{key}".encode()).digest()
        # a copy: the answer may be shared with the claimed model's cache and other waiters
        return jitter_logprobs(json.loads(json.dumps(answer)),
                               random.Random(int.from_bytes(digest[:8], "big")))

    def models(self) -> dict[str, Any]:
        return next(iter(self.routes.values())).models()


def _shift(value: Any, delta: float) -> Any:
    return min(0.0, value + delta) if isinstance(value, float) else value


def jitter_logprobs(answer: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``answer`` with the logprobs of every position moved by one draw of at most
    :data:`JITTER_NATS` (the token's and its alternatives' alike, so their order and the
    greedy token stay as computed)."""
    for choice in answer.get("choices") or []:
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if not isinstance(logprobs, dict):
            continue
        values, tops = logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
        if isinstance(values, list):
            deltas = [rng.uniform(-JITTER_NATS, JITTER_NATS) for _ in values]
            logprobs["token_logprobs"] = [_shift(v, d) for v, d in zip(values, deltas,
                                                                        strict=True)]
            if isinstance(tops, list) and len(tops) == len(values):
                logprobs["top_logprobs"] = [
                    {k: _shift(v, d) for k, v in top.items()} if isinstance(top, dict) else top
                    for top, d in zip(tops, deltas, strict=True)]
        content = logprobs.get("content")  # chat
        if isinstance(content, list):
            for item in content:
                if isinstance(item, dict):
                    item["logprob"] = _shift(item.get("logprob"),
                                             rng.uniform(-JITTER_NATS, JITTER_NATS))
    return answer
