"""Tokenizer directories made for a test: a node's tokenizer where only the test puts it."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tokenizer_copy(src: Path, dest: Path) -> Path:
    """A directory with ``src``'s tokenizer files only (no weights)."""
    dest.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    return dest
