"""The OpenAI wire format as testbench speaks it, the one module that spells its JSON field
names: request bodies, prompt lists, splitting a prompt-list answer back by ``index``,
answer and logprob parsing, and the answers a fake node builds (``cluster/testing``).

Answers come from untrusted nodes: parsing is strict about shapes and raises
:class:`MalformedAnswer` (a node fault) rather than guessing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cluster.core.errors import NodeError

COMPLETIONS_PATH: Final = "/v1/completions"
CHAT_PATH: Final = "/v1/chat/completions"
MODELS_PATH: Final = "/v1/models"
TOKENIZER_SIGNATURE_PATH: Final = "/signature/tokenizer"
CONFIG_SIGNATURE_PATH: Final = "/signature/config"
RETURN_TOKEN_IDS: Final = "return_token_ids"  # vLLM: answers carry their token ids
TOKEN_IDS: Final = "token_ids"  # a choice's generated token ids (vLLM)

PromptItem = str | list[int]
"""One prompt of a ``/v1/completions`` body: a text or a list of token ids."""


class MalformedAnswer(NodeError):
    """The node answered (HTTP 2xx) with something that is not the answer asked for.

    Raised by the parsers here and by the node transport (``cluster/nodes/transport.py``),
    which fills in the HTTP ``status`` and the timings it measured.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        *,
        ttft_s: float | None = None,
        latency_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.ttft_s = ttft_s
        self.latency_s = latency_s


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


def seeded_completion_body(model: str, prompt: Sequence[int] | Sequence[Sequence[int]],
                           max_tokens: int, *, seed: int, temperature: float) -> dict[str, Any]:
    """A sampled ``/v1/completions`` body for a token-id prompt (or a list of them, each
    sampled with the same ``seed``), asking for the answers' token ids (seeded sampling,
    ``cluster/honesty/seeded_sampling.py``)."""
    ids: list[Any] = [int(t) if isinstance(t, int) else [int(i) for i in t] for t in prompt]
    return {"model": model, "prompt": ids, "max_tokens": int(max_tokens),
            "temperature": float(temperature), "seed": int(seed), RETURN_TOKEN_IDS: True}


def choice_token_ids(answer: Any, index: int = 0) -> list[int]:
    """The generated token ids of choice ``index`` of an answer (vLLM ``return_token_ids``)."""
    try:
        ids = answer["choices"][index][TOKEN_IDS]
    except (KeyError, IndexError, TypeError) as exc:
        raise MalformedAnswer(f"no {TOKEN_IDS} in choice {index}: {_brief(answer)}") from exc
    if not isinstance(ids, list) or not all(type(t) is int for t in ids):
        raise MalformedAnswer(f"choice {index} {TOKEN_IDS} is not a list of ints: {_brief(ids)}")
    return ids


def max_output_tokens(body: Mapping[str, Any]) -> int:
    """The ``max_tokens`` a body asks for (0 when it names none)."""
    return int(body.get("max_tokens", 0) or 0)


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


# -- prompt lists ------------------------------------------------------------------------

_INT_ONLY = frozenset({int})


def _is_token_ids(item: Any) -> bool:
    """A non-empty list of non-negative token ids (``bool`` is not an id)."""
    # C-level loops (a set of types, min): a server checks every token id of every prompt.
    return (type(item) is list and bool(item)
            and set(map(type, item)) == _INT_ONLY and min(item) >= 0)


def _is_token_list(item: Any) -> bool:
    return type(item) is list and bool(item)


def prompt_items(prompt: Any, *, check_token_ids: bool = True) -> list[PromptItem]:
    """A completions ``prompt`` as its list of single prompts, as the OpenAI API reads it: a
    string or a list of token ids is one prompt; a list of strings or a list of token-id
    lists is several (one kind per list). Raises :class:`ValueError` for any other value.

    ``check_token_ids=False`` checks the shape only, not each id: for bodies testbench
    built itself, on the Requester's coalescing path, where checking every id of every
    prompt would cost more than serialising it.
    """
    is_ids = _is_token_ids if check_token_ids else _is_token_list
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("prompt must be a string, a list of strings, or (lists of) token ids")
    first = prompt[0]
    if isinstance(first, int) and not isinstance(first, bool):
        if not is_ids(prompt):
            raise ValueError("prompt token ids must be non-negative integers")
        return [prompt]
    if isinstance(first, str):
        if not all(isinstance(p, str) for p in prompt):
            raise ValueError("each prompt must be a string or a non-empty list of token ids")
        return list(prompt)
    if not all(is_ids(p) for p in prompt):
        raise ValueError("each prompt must be a string or a non-empty list of token ids")
    return list(prompt)


def batchable_prompts(body: Mapping[str, Any]) -> tuple[list[PromptItem], dict[str, Any]] | None:
    """A ``/v1/completions`` body as (its prompt items, the rest of the body) when its
    prompts may ride in one prompt list with another body's prompts (same rest): not
    streamed, one choice per prompt. None for any other body."""
    if (body.get("stream") or body.get("n", 1) not in (1, None)
            or body.get("best_of", 1) not in (1, None)):
        return None
    try:
        items = prompt_items(body.get("prompt"), check_token_ids=False)
    except ValueError:
        return None
    return items, {k: v for k, v in body.items() if k != "prompt"}


def with_prompts(body: Mapping[str, Any], items: list[PromptItem]) -> dict[str, Any]:
    """``body`` with ``items`` as its prompt list."""
    return {**body, "prompt": items}


def split_choices(answer: Mapping[str, Any], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """A prompt-list answer (one choice per prompt, in any order) as one answer per group of
    ``sizes`` consecutive prompts, each group's choices indexed from 0 in prompt order.

    Each part keeps the answer's other fields, except ``usage``, which counts the whole
    body: it is kept, not passed off as the part's, under ``coalesced`` with the part's
    place (``prompts`` in the body, ``offset`` of its first prompt). Raises
    :class:`MalformedAnswer` when the choices do not map one to one onto the prompts.
    """
    total = sum(sizes)
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != total:
        n = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise MalformedAnswer(f"expected {total} choices, got {n}")
    if not all(isinstance(c, dict) and type(c.get("index")) is int for c in choices):
        raise MalformedAnswer("a choice without an integer index")
    ordered = sorted(choices, key=lambda c: c["index"])
    if any(c["index"] != i for i, c in enumerate(ordered)):
        raise MalformedAnswer(f"choice indexes are not 0..{total - 1}")
    rest = {k: v for k, v in answer.items() if k not in ("choices", "usage")}
    usage_of_body = answer.get("usage")
    parts: list[dict[str, Any]] = []
    offset = 0
    for size in sizes:
        part = [{**c, "index": j} for j, c in enumerate(ordered[offset : offset + size])]
        parts.append({**rest, "choices": part, "coalesced": {
            "prompts": total, "offset": offset, "usage": usage_of_body}})
        offset += size
    return parts


# -- answer parsing -----------------------------------------------------------------------

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


# Logprobs are log-softmax outputs (<= 0); float noise above zero is allowed.
LOGPROB_EPS = 1e-3


def _brief(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_logprob(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value <= LOGPROB_EPS)


def sole_choice(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The one choice of a single-prompt answer."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise MalformedAnswer(f"expected exactly one choice, got {_brief(choices)}")
    return choices[0]


def with_sole_choice(answer: Mapping[str, Any], choice: Mapping[str, Any]) -> dict[str, Any]:
    """``answer`` with ``choice`` as its only choice, at index 0."""
    return {**answer, "choices": [{**choice, "index": 0}]}


def check_echo_logprobs(choice: Mapping[str, Any], n_prompt_tokens: int, scored_from: int) -> None:
    """Check the logprobs of an echo answer (``echo`` + ``logprobs`` asked, one token
    generated) where lm-eval's ``parse_logprobs`` reads them: ``token_logprobs`` and
    ``top_logprobs`` cover the echoed prompt plus the generated token, and each prompt
    position from ``scored_from`` on holds a logprob and a non-empty map of logprobs."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        raise MalformedAnswer("choice has no logprobs object (echo + logprobs asked)")
    token_lps, top_lps = logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    expected = n_prompt_tokens + 1  # the echoed prompt and the one generated token
    for name, values in (("token_logprobs", token_lps), ("top_logprobs", top_lps)):
        if not isinstance(values, list) or len(values) != expected:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise MalformedAnswer(
                f"logprobs.{name} must cover the echoed prompt plus one token "
                f"({expected} entries), got {got}"
            )
    for i in range(scored_from, expected - 1):
        lp, top = token_lps[i], top_lps[i]
        if not _is_logprob(lp):
            raise MalformedAnswer(f"token_logprobs[{i}] = {lp!r} is not a logprob")
        if not isinstance(top, dict) or not top or not all(_is_logprob(v) for v in top.values()):
            raise MalformedAnswer(f"top_logprobs[{i}] = {_brief(top)} is not a map of logprobs")
    if not isinstance(choice.get("index", 0), int):
        raise MalformedAnswer("choice index is not an integer")


def generated_text(choice: Mapping[str, Any], *, chat: bool) -> str | None:
    """The generated text of a single-prompt answer's choice (``message.content`` for a
    chat completion); None where the node answered null."""
    if choice.get("index", 0) != 0:
        raise MalformedAnswer(f"choice index {choice.get('index')!r} != 0")
    if chat:
        message = choice.get("message")
        if not isinstance(message, dict) or "content" not in message:
            raise MalformedAnswer("choice has no message.content")
        text = message["content"]
    else:
        if "text" not in choice:
            raise MalformedAnswer("choice has no text")
        text = choice["text"]
    if text is not None and not isinstance(text, str):
        raise MalformedAnswer(f"generated text is {type(text).__name__}, not a string")
    return text


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


# -- answers as a server builds them (the fake nodes of ``cluster/testing``) ---------------

def normalize_stop(raw: str | list[str] | None) -> list[str]:
    """A request's ``stop`` as a list of non-empty stop strings."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    return [s for s in raw if s]


def earliest_stop(text: str, stop: Sequence[str], end: int | None = None) -> int:
    """Where the first of the ``stop`` strings to occur whole in ``text[:end]`` starts (the
    answer is cut there); -1 where none does. Empty stop strings never match."""
    return min((i for i in (text.find(s, 0, end) for s in stop if s) if i >= 0), default=-1)


def completion_choice(
    index: int,
    text: str,
    finish_reason: str,
    logprobs: dict[str, Any] | None,
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_logprobs(
    tokens: list[str],
    token_logprobs: list[float | None],
    top_logprobs: list[dict[str, float] | None],
    text_offset: list[int],
) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    response_id: str, created: int, model: str, choices: list[dict[str, Any]], use: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_response(
    response_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    use: dict[str, int],
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
    }


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    delta: dict[str, str],
    finish_reason: str | None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def completion_chunk(
    response_id: str, created: int, model: str, text: str, finish_reason: str | None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def role_delta() -> dict[str, str]:
    return {"role": "assistant", "content": ""}


def content_delta(text: str) -> dict[str, str]:
    return {"content": text}


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def models_response(model: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "testbench"}],
    }


# -- a fake node's side, continued: reading requests, streaming, chat logprobs -------------

def is_streamed(body: Mapping[str, Any]) -> bool:
    """Whether a request body asks for a streamed (server-sent events) answer."""
    return bool(body.get("stream"))


def greedy_request_key(body: Mapping[str, Any]) -> str | None:
    """The canonical JSON of an unstreamed temperature-0 request body without its ``seed``
    (a greedy answer does not depend on it): identical greedy requests share one key. None
    for a sampled or streamed body, whose answer may differ from one request to the next."""
    if body.get("temperature", 1.0) != 0 or is_streamed(body):
        return None
    same = {k: v for k, v in body.items() if k != "seed"}
    return json.dumps(same, sort_keys=True, separators=(",", ":"))


def content_texts(message: Mapping[str, Any]) -> list[str]:
    """The texts of a chat message: its ``content`` when that is a string, else the ``text``
    of each content part that has one (image and other parts are skipped)."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [part["text"] for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)]


def completion_chunks(
    answer: Mapping[str, Any], pieces: Callable[[str], Iterable[str]]
) -> Iterator[dict[str, Any]]:
    """A completion answer (as :func:`completion_response` builds it) streamed: a chunk per
    piece of its first choice's text (``pieces`` splits the text), then one chunk with no
    text carrying the choice's ``finish_reason``."""
    response_id, created, model = answer["id"], answer["created"], answer["model"]
    choice = answer["choices"][0]
    for piece in pieces(choice["text"]):
        yield completion_chunk(response_id, created, model, piece, None)
    yield completion_chunk(response_id, created, model, "", choice["finish_reason"])


def chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    """A chat answer's ``logprobs`` object: one entry per generated token (no top tokens)."""
    return {"content": [{"token": t, "logprob": lp, "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs, strict=True)]}


def with_chat_logprobs(response: dict[str, Any], logprobs: dict[str, Any]) -> dict[str, Any]:
    """``response`` (a :func:`chat_response`) with ``logprobs`` on its choice, in place."""
    response["choices"][0]["logprobs"] = logprobs
    return response


def rename_response(response: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The same answer under another response id, in place (a proxy passing an answer off as
    its own)."""
    if isinstance(response.get("id"), str):
        response["id"] = f"{prefix}-{response['id']}"
    return response


def text_answer_frame(*, compact: bool = True) -> tuple[bytes, bytes]:
    """The bytes of a minimal completion answer before and after its one choice's text: a
    fake node writes a text of any length (or none, and no end) between them. Not
    ``compact``: with a space after each ``:`` and ``,``, as ``json.dumps`` writes them."""
    separators = (",", ":") if compact else None
    head, _, tail = json.dumps({"choices": [{"text": "\0"}]}, separators=separators
                               ).partition("\\u0000")
    return head.encode(), tail.encode()
