"""Organic jobs as text lines (``testbench organic list``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cluster.core.errors import ErrorCode


def format_job(doc: Mapping[str, Any]) -> str:
    took = doc.get("latency_s")
    where = doc.get("node_id") or "-"
    head = (f"{doc['_id'][:12]}  {doc.get('state', '?'):<7} {where:<22} "
            f"{(f'{took:.2f}s' if took is not None else '-'):>7}  ")
    if doc.get("state") == "done":
        return head + json.dumps(str(doc.get("answer", ""))[:60])
    return head + f"{ErrorCode(doc.get('error_code', 1)).name}: {str(doc.get('error'))[:80]}"
