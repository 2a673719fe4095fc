"""Wire format of the zoo's nodes: the test node's OpenAI request models and builders, plus
what the zoo adds (logprobs of chat answers). The only zoo module spelling JSON fields."""

from __future__ import annotations

from typing import Any

from cluster.testing.testnode.protocol import (
    ChatRequest,
    CompletionRequest,
    chat_response,
    completion_choice,
    completion_logprobs,
    completion_response,
    error_body,
    models_response,
    normalize_stop,
    usage,
)

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "chat_logprobs",
    "chat_response",
    "completion_choice",
    "completion_logprobs",
    "completion_response",
    "error_body",
    "models_response",
    "normalize_stop",
    "rename_response",
    "usage",
    "with_chat_logprobs",
]


def chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object: one entry per generated token."""
    return {"content": [{"token": t, "logprob": lp, "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs, strict=True)]}


def with_chat_logprobs(response: dict[str, Any], logprobs: dict[str, Any]) -> dict[str, Any]:
    response["choices"][0]["logprobs"] = logprobs
    return response


def rename_response(response: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The same answer under another response id (a proxy passing an answer off as its own)."""
    if isinstance(response.get("id"), str):
        response["id"] = f"{prefix}-{response['id']}"
    return response
