"""Errors raised by the stores themselves (not by the data in them)."""

from __future__ import annotations

import re

from cluster.core.errors import ErrorCode, TestbenchError


class StoreUnavailableError(TestbenchError):
    """A database server cannot be reached or refused the connection."""

    code = ErrorCode.DATABASE_READ


_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:@/]*):[^@/]*@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``scheme://user:secret@host`` → ``scheme://user:***@host`` for messages and logs."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", url)
