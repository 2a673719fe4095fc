"""Signatures of the model a node serves: digests of its tokenizer and config files.

Plain logic, no Ray: the builder turns ``ModelSignatures`` into a small Serve deployment
and the node's ingress exposes it as ``GET /signature/...``. The digests are recomputed on
every call (the files are small), so a signature always describes the bytes on disk now.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.core.errors import TestbenchError
from cluster.modeldir.sources import SourceKind, resolve_local, source_kind
from cluster.wire.signatures import ConfigSignature, FileDigest, TokenizerSignature

log = logging.getLogger(__name__)

# Every file a Hugging Face tokenizer may load from (transformers 5 keeps the chat
# template beside the tokenizer in chat_template.jinja; it changes chat prompts, so it
# belongs to the tokenizer's signature).
TOKENIZER_FILES: tuple[str, ...] = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
)
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CONFIG_FILES: tuple[str, ...] = (CONFIG_FILE, GENERATION_CONFIG_FILE)

_MEDIA_TYPES = {".json": "application/json", ".jinja": "text/plain", ".txt": "text/plain"}
_CHUNK = 1 << 20


class SignatureError(TestbenchError):
    """The model's signature files cannot be found or read."""


class UnknownSignatureFile(SignatureError):
    """A file was asked for that is not one of the model's tokenizer files."""


@dataclass(frozen=True)
class SignatureFile:
    """One tokenizer file's bytes, ready to be served."""

    name: str
    content: bytes
    sha256: str
    media_type: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def combined_sha256(files: Iterable[FileDigest]) -> str:
    """sha256 of the ``sha256sum`` manifest of ``files``, sorted by name (see protocol)."""
    manifest = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


def digest_files(model_dir: Path, names: Iterable[str]) -> list[FileDigest]:
    """Digests of those of ``names`` present in ``model_dir``, sorted by name."""
    found = []
    for name in sorted(names):
        path = model_dir / name
        if path.is_file():
            found.append(FileDigest(name=name, size=path.stat().st_size, sha256=sha256_file(path)))
    return found


def resolve_model_dir(model_source: str) -> Path:
    """The local directory holding the signature files of ``model_source``.

    A hub repo id is resolved through the Hugging Face cache, fetching only the small
    tokenizer and config files (online, or from the cache under ``HF_HUB_OFFLINE=1``).
    """
    kind = source_kind(model_source)
    if kind is SourceKind.LOCAL:
        model_dir = resolve_local(model_source)
        if not model_dir.is_dir():
            raise SignatureError(
                f"model directory {model_dir} (from model_source={model_source!r}) does not "
                "exist on this node; the signature deployment must see the same files as vLLM"
            )
        return model_dir
    if kind is SourceKind.REMOTE:
        raise SignatureError(
            f"model_source={model_source!r} is a remote URI; signature endpoints need a local "
            "directory or a Hugging Face repo id"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id=model_source, allow_patterns=[*TOKENIZER_FILES, *CONFIG_FILES])
        )
    except Exception as exc:  # hub errors have many types; keep the cause attached
        raise SignatureError(
            f"cannot fetch the tokenizer/config files of {model_source!r} from the Hugging "
            f"Face hub or its cache: {exc}"
        ) from exc


def _load_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot read {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise SignatureError(f"{path} does not hold a JSON object")
    return loaded


class ModelSignatures:
    """Tokenizer and config signatures of one served model."""

    def __init__(self, model_id: str, model_source: str) -> None:
        self.model_id = model_id
        self.model_dir = resolve_model_dir(model_source)
        if not digest_files(self.model_dir, TOKENIZER_FILES):
            raise SignatureError(f"{self.model_dir} holds none of the tokenizer files {TOKENIZER_FILES}")
        if not (self.model_dir / CONFIG_FILE).is_file():
            raise SignatureError(f"{self.model_dir} has no {CONFIG_FILE}")
        log.info("signatures_ready model=%s dir=%s", model_id, self.model_dir)

    def tokenizer(self) -> TokenizerSignature:
        files = digest_files(self.model_dir, TOKENIZER_FILES)
        return TokenizerSignature(model=self.model_id, files=files, sha256=combined_sha256(files))

    def config(self) -> ConfigSignature:
        files = digest_files(self.model_dir, CONFIG_FILES)
        generation = self.model_dir / GENERATION_CONFIG_FILE
        return ConfigSignature(
            model=self.model_id,
            files=files,
            sha256=combined_sha256(files),
            config=_load_json(self.model_dir / CONFIG_FILE),
            generation_config=_load_json(generation) if generation.is_file() else None,
        )

    def tokenizer_file(self, name: str) -> SignatureFile:
        """The bytes of one tokenizer file; only names listed by ``tokenizer()`` are served."""
        path = self.model_dir / name
        if name not in TOKENIZER_FILES or not path.is_file():
            raise UnknownSignatureFile(
                f"{name!r} is not a tokenizer file of model {self.model_id!r}; "
                "GET /signature/tokenizer lists them"
            )
        content = path.read_bytes()
        return SignatureFile(
            name=name,
            content=content,
            sha256=hashlib.sha256(content).hexdigest(),
            media_type=_MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
        )
