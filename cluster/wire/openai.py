"""The OpenAI wire format as the honesty checks speak it (the one place, on the validator's
side, that spells these JSON field names): request bodies and answer parsing.

Answers come from untrusted nodes: parsing is strict about shapes and raises
:class:`MalformedAnswer` (a node fault) rather than guessing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.core.errors import NodeError

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
TOKENIZER_SIGNATURE_PATH = "/signature/tokenizer"
CONFIG_SIGNATURE_PATH = "/signature/config"


class MalformedAnswer(NodeError):
    """The node answered HTTP 200 with something that is not the answer asked for."""


@dataclass(frozen=True)
class CompletionChoice:
    """One choice of a completion: its text and, when asked for, per-token logprobs."""

    text: str
    tokens: tuple[str, ...] | None
    token_logprobs: tuple[float | None, ...] | None
    top_logprobs: tuple[float | None, ...] | None  # the best logprob at each position
    finish_reason: str | None


def completion_body(
    model: str,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_tokens: int,
    *,
    seed: int,
    logprobs: int | None = None,
    echo: bool = False,
) -> dict[str, Any]:
    """A temperature-0 ``/v1/completions`` body; ``prompts`` are texts or token-id lists."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": [p if isinstance(p, str) else [int(t) for t in p] for p in prompts],
        "max_tokens": int(max_tokens),
        "temperature": 0.0,
        "seed": int(seed),
    }
    if logprobs is not None:
        body["logprobs"] = int(logprobs)
    if echo:
        body["echo"] = True
    return body


def chat_body(model: str, prompt: str, max_tokens: int, *, seed: int) -> dict[str, Any]:
    """A temperature-0 ``/v1/chat/completions`` body with one user message."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": int(max_tokens),
        "temperature": 0.0,
        "seed": int(seed),
        "logprobs": True,
    }


def _float_or_none(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedAnswer(f"{what} is not a number: {value!r}"[:200])
    result = float(value)
    if math.isnan(result):
        raise MalformedAnswer(f"{what} is NaN")
    return result


def _best(top: Any, what: str) -> float | None:
    """The best logprob of one ``top_logprobs`` entry (a token → logprob mapping)."""
    if top is None:
        return None
    if not isinstance(top, Mapping):
        raise MalformedAnswer(f"{what} is not a mapping")
    values = [_float_or_none(v, what) for v in top.values()]
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _logprobs(raw: Any, index: int) -> tuple[
    tuple[str, ...] | None, tuple[float | None, ...] | None, tuple[float | None, ...] | None
]:
    if raw is None:
        return None, None, None
    if not isinstance(raw, Mapping):
        raise MalformedAnswer(f"choice {index}: logprobs is not an object")
    tokens, lps, tops = raw.get("tokens"), raw.get("token_logprobs"), raw.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(lps, list) or len(tokens) != len(lps):
        raise MalformedAnswer(f"choice {index}: tokens and token_logprobs do not line up")
    if tops is not None and (not isinstance(tops, list) or len(tops) != len(lps)):
        raise MalformedAnswer(f"choice {index}: top_logprobs does not line up with tokens")
    return (
        tuple(str(t) for t in tokens),
        tuple(_float_or_none(v, f"choice {index} token_logprobs") for v in lps),
        None if tops is None else tuple(_best(t, f"choice {index} top_logprobs") for t in tops),
    )


def parse_completion(body: Any, expected_choices: int) -> list[CompletionChoice]:
    """The choices of a ``/v1/completions`` answer in prompt order (by ``index``)."""
    if not isinstance(body, Mapping) or not isinstance(body.get("choices"), list):
        raise MalformedAnswer("not a completion: no choices list")
    by_index: dict[int, CompletionChoice] = {}
    for position, raw in enumerate(body["choices"]):
        if not isinstance(raw, Mapping):
            raise MalformedAnswer(f"choice {position} is not an object")
        index = raw.get("index", position)
        text = raw.get("text")
        if not isinstance(index, int) or not isinstance(text, str):
            raise MalformedAnswer(f"choice {position}: index/text missing or mistyped")
        tokens, lps, tops = _logprobs(raw.get("logprobs"), index)
        finish = raw.get("finish_reason")
        by_index[index] = CompletionChoice(text, tokens, lps, tops,
                                           finish if isinstance(finish, str) else None)
    if sorted(by_index) != list(range(expected_choices)):
        raise MalformedAnswer(
            f"expected choices 0..{expected_choices - 1}, got indexes {sorted(by_index)[:10]}")
    return [by_index[i] for i in range(expected_choices)]


def parse_chat(body: Any) -> CompletionChoice:
    """The first choice of a ``/v1/chat/completions`` answer (logprobs when present)."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise MalformedAnswer(f"not a chat completion: {type(exc).__name__}: {exc}") from exc
    if not isinstance(text, str):
        raise MalformedAnswer("chat completion content is not a string")
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice, Mapping) else None
    tokens = lps = None
    if isinstance(content, list):
        tokens = tuple(str(c.get("token", "")) if isinstance(c, Mapping) else "" for c in content)
        lps = tuple(_float_or_none(c.get("logprob") if isinstance(c, Mapping) else None,
                                   "chat logprob") for c in content)
    finish = choice.get("finish_reason")
    return CompletionChoice(text, tokens, lps, None, finish if isinstance(finish, str) else None)


def signature_sha256(body: Any) -> str:
    """The combined ``sha256`` of a signature answer (``cluster/wire/signatures.py``)."""
    digest = body.get("sha256") if isinstance(body, Mapping) else None
    if not isinstance(digest, str) or len(digest) != 64 or any(
            c not in "0123456789abcdef" for c in digest):
        raise MalformedAnswer("signature answer has no hex sha256")
    return digest
