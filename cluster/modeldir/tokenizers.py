"""Where a node's tokenizer is: the rule applied before a node is registered.

The loop loads a node's tokenizer in the processes that run the Sampler and Evaluator (Ray
workers, a Ray job's working directory), not in the one that registered the node, so a
relative path would name another directory there, or none. The rule:

- a path (absolute, starting with ``.`` or ``~``, or naming an existing directory; the
  split of :func:`cluster.modeldir.sources.source_kind`) is stored absolute, and only if it
  is a directory holding a tokenizer's vocabulary (one of :data:`VOCABULARY_FILES`);
- a remote URI (``s3://``...) is refused: a tokenizer loads from a directory or the hub;
- anything else is a Hugging Face hub id, stored as given while the hub is on; with the hub
  off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set) only if the local Hugging Face
  cache already holds its tokenizer, which is all an offline load can read.

Only files are looked at: loading the tokenizer (transformers) takes seconds, too much for
``testbench nodes add``; a directory that passes and still does not load is reported by the
loop as an unmeasurable pair with the loader's reason.
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.core.errors import RegistrationError
from cluster.core.schemas import Node
from cluster.modeldir.sources import SourceKind, source_kind

# What a Hugging Face tokenizer cannot load without: its vocabulary, in one of the
# formats transformers reads (fast tokenizer, sentencepiece, BPE, WordPiece).
VOCABULARY_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "vocab.json", "vocab.txt",
)
OFFLINE_FLAGS: tuple[str, ...] = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}


def hub_offline_flag() -> str | None:
    """The environment variable switching the Hugging Face hub off for tokenizers, if any."""
    for flag in OFFLINE_FLAGS:
        if os.environ.get(flag, "").strip().lower() in _TRUE:
            return flag
    return None


def _is_path(value: str, cwd: Path) -> bool:
    if value.startswith(("/", ".", "~")):
        return True
    return (cwd / Path(value).expanduser()).is_dir()


def _cached_on_hub(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds this repo's tokenizer."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("tokenizer_config.json", *VOCABULARY_FILES):
        try:
            found = try_to_load_from_cache(repo_id, name)
        except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
            return False
        if isinstance(found, str):
            return True
    return False


def resolve_tokenizer(value: str, cwd: Path | None = None) -> str:
    """``value`` as the loop must store it: an absolute tokenizer directory or a hub id.

    Raises :class:`RegistrationError` with the reason when it cannot be used."""
    value = value.strip()
    if not value:
        raise RegistrationError("tokenizer: empty; give a directory or a Hugging Face hub id")
    if source_kind(value) is SourceKind.REMOTE:
        raise RegistrationError(
            f"tokenizer {value!r} is a remote URI; give a local directory or a Hugging Face "
            "hub id")
    where = (cwd or Path.cwd()).resolve()
    if _is_path(value, where):
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else where / path).resolve()
        if not path.is_dir():
            raise RegistrationError(
                f"tokenizer {value!r}: {path} is not a directory"
                + ("" if path.exists() else " (it does not exist)")
                + f"; relative paths are resolved against the working directory {where}")
        if not any((path / name).is_file() for name in VOCABULARY_FILES):
            raise RegistrationError(
                f"tokenizer {value!r}: {path} holds no tokenizer vocabulary (none of "
                f"{', '.join(VOCABULARY_FILES)})")
        return str(path)
    flag = hub_offline_flag()
    if flag is not None and not _cached_on_hub(value):
        raise RegistrationError(
            f"tokenizer {value!r} is not a directory under {where}, and as a Hugging Face "
            f"hub id it cannot load: the hub is switched off ({flag}={os.environ[flag]}) and "
            "the local cache does not hold it; give the tokenizer's directory")
    return value


def registered_node(node: Node, cwd: Path | None = None) -> Node:
    """``node`` with its tokenizer resolved by :func:`resolve_tokenizer` (unchanged when it
    names none): what every registration path stores."""
    if node.tokenizer is None:
        return node
    return node.model_copy(update={"tokenizer": resolve_tokenizer(node.tokenizer, cwd)})
