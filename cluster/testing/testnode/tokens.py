"""Tokenizers for the test node: the real Hugging Face tokenizer of a local model
directory, or a byte-level stand-in when no tokenizer is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class TokenCodec(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and, per token, the character offset where it ends in ``text``."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...


class ByteCodec:
    """One token per UTF-8 byte (ids 0..255). Lossless for text; used without a tokenizer."""

    vocab_size = 256

    def __init__(self) -> None:
        self._texts = [bytes([i]).decode("latin-1") for i in range(256)]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        ends: list[int] = []
        for i, char in enumerate(text):
            data = char.encode("utf-8")
            ids.extend(data)
            ends.extend([i + 1] * len(data))
        return ids, ends

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i & 0xFF for i in ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self._texts[token_id & 0xFF]


class HfCodec:
    """A Hugging Face tokenizer from a local directory.

    ``tokenizer.json`` is loaded with the ``tokenizers`` library directly (the same fast
    tokenizer ``AutoTokenizer`` wraps, without importing transformers); directories
    without one fall back to ``transformers.AutoTokenizer``. Special tokens are never
    added on encode and never skipped on decode, as lm-eval's API models do.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._texts: dict[int, str] = {}
        self._fast: Any = None
        self._auto: Any = None
        tokenizer_json = self.path / "tokenizer.json"
        if tokenizer_json.is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(tokenizer_json))
            self.vocab_size = int(self._fast.get_vocab_size(with_added_tokens=True))
        else:
            from transformers import AutoTokenizer

            self._auto = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.vocab_size = len(self._auto)
        log.info("testnode_tokenizer_loaded path=%s vocab=%d", self.path, self.vocab_size)

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=False).ids)
        return list(self._auto(text, add_special_tokens=False).input_ids)

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        if self._fast is not None:
            enc = self._fast.encode(text, add_special_tokens=False)
            return list(enc.ids), [end for _, end in enc.offsets]
        out = self._auto(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out.input_ids), [end for _, end in out.offset_mapping]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if self._fast is not None:
            return str(self._fast.decode(ids, skip_special_tokens=False))
        return str(self._auto.decode(ids, skip_special_tokens=False))

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self.decode([token_id])
            self._texts[token_id] = text
        return text


_codecs: dict[str, TokenCodec] = {}
_codecs_lock = threading.Lock()


def load_codec(path: str | Path | None) -> TokenCodec:
    """The codec for ``path`` (shared per path: loading a tokenizer takes a while)."""
    key = "" if path is None else str(Path(path).resolve())
    with _codecs_lock:
        codec = _codecs.get(key)
        if codec is None:
            codec = ByteCodec() if path is None else HfCodec(path)
            _codecs[key] = codec
        return codec
