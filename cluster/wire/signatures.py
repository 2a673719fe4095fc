"""Wire models of the signature endpoints (the only place their JSON field names are spelled).

Combined digests follow one rule everywhere: ``sha256`` of the ``sha256sum`` manifest of the
files, i.e. the UTF-8 bytes of ``"<hex sha256>  <file name>\\n"`` per file, sorted by file
name (by code point). A client can recompute it from the files alone:
``sha256sum FILE... | LC_ALL=C sort -k2 | sha256sum`` prints the same hex.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileDigest(WireModel):
    """One file of the model directory and its digest."""

    name: str = Field(description="file name inside the model directory")
    size: int = Field(ge=0, description="size in bytes")
    sha256: str = Field(description="hex sha256 of the file's bytes")


class TokenizerSignature(WireModel):
    """``GET /signature/tokenizer``: the tokenizer files the node serves with."""

    model: str = Field(description="served model name (the OpenAI `model` field)")
    files: list[FileDigest] = Field(description="tokenizer files, sorted by name")
    sha256: str = Field(description="combined digest of `files` (see module docstring)")


class ConfigSignature(WireModel):
    """``GET /signature/config``: the model's config.json and generation config."""

    model: str = Field(description="served model name (the OpenAI `model` field)")
    files: list[FileDigest] = Field(description="config files, sorted by name")
    sha256: str = Field(description="combined digest of `files` (see module docstring)")
    config: dict[str, Any] = Field(description="parsed config.json")
    generation_config: dict[str, Any] | None = Field(
        default=None, description="parsed generation_config.json, when the model has one"
    )
