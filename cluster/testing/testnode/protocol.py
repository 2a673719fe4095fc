"""The OpenAI requests the test node serves, as pydantic models (what it accepts, and with
which defaults). The prompt-list rule, the stop list and every answer the node builds are
:mod:`cluster.wire.openai`'s, shared with the validator's side of the wire.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.wire.openai import PromptItem, prompt_items

DEFAULT_CHAT_MAX_TOKENS = 256


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
        return prompt_items(v)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False

    def output_limit(self) -> int:
        """The most tokens to generate: ``max_completion_tokens`` (OpenAI's newer name)
        over ``max_tokens`` over :data:`DEFAULT_CHAT_MAX_TOKENS`."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens if self.max_tokens is not None else DEFAULT_CHAT_MAX_TOKENS
