"""The one verdict vocabulary: a check on a node passes, fails, or could not be made.

``unknown`` is its own value everywhere, stored and read as such: a node whose check is
unknown is *unverified*, never trusted as if it had passed.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    UNKNOWN = "unknown"
