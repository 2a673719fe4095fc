"""OpenAI wire format for the test node: request models and response builders.

This is the only module of the test node that spells JSON field names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PromptItem = str | list[int]


def normalize_prompts(raw: Any) -> list[PromptItem]:
    """``prompt`` as a list of items: a string, strings, token ids, or lists of token ids."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise ValueError("prompt must be a string, a list of strings, or (lists of) token ids")
    first = raw[0]
    if isinstance(first, int) and not isinstance(first, bool):
        if not all(type(t) is int and t >= 0 for t in raw):
            raise ValueError("prompt token ids must be non-negative integers")
        return [raw]
    items: list[PromptItem] = []
    for item in raw:
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, list) and item and all(type(t) is int and t >= 0 for t in item):
            items.append(item)
        else:
            raise ValueError("each prompt must be a string or a non-empty list of token ids")
    return items


def normalize_stop(raw: str | list[str] | None) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    return [s for s in raw if s]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")


class CompletionRequest(_Request):
    prompt: list[PromptItem]
    max_tokens: int = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> list[PromptItem]:
        return normalize_prompts(v)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False


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


StreamKind = Literal["chat", "completion"]
