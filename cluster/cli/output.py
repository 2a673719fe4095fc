"""How every command talks to its user: results on stdout, progress and errors on stderr."""

from __future__ import annotations

import sys


def error(message: str) -> None:
    print(f"testbench: error: {message}", file=sys.stderr)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
