"""What an LLM node's ``model_source`` names: a local directory, a hub repo or a remote URI.

The rule, shared by the builder (which hands vLLM an absolute path) and the signature
deployment (which reads the same files):

- absolute, or starting with ``.`` or ``~`` (``./.cache/models/smollm2``, ``.cache/...``,
  ``~/models/x``): a local directory; relative paths are relative to the working
  directory of the process that resolves them (the one running ``serve run`` or the Serve
  application builder).
- ``scheme://...`` (``s3://``, ``gs://``, ``pvc://``...): a remote URI, downloaded by Ray
  Serve LLM itself (the signature endpoints cannot read it).
- anything else (``HuggingFaceTB/SmolLM2-135M-Instruct``): a Hugging Face hub repo id.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SourceKind(StrEnum):
    LOCAL = "local"
    HUB = "hub"
    REMOTE = "remote"


def source_kind(model_source: str) -> SourceKind:
    if _URI.match(model_source):
        return SourceKind.REMOTE
    if model_source.startswith(("/", ".", "~")) or Path(model_source).expanduser().is_dir():
        return SourceKind.LOCAL
    return SourceKind.HUB


def resolve_local(model_source: str, cwd: Path | None = None) -> Path:
    """The absolute directory a local ``model_source`` names (existence is not checked)."""
    path = Path(model_source).expanduser()
    if not path.is_absolute():
        path = (cwd or Path.cwd()) / path
    return path.resolve()
