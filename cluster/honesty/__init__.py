"""Honesty checks: signed receipts of streaming jobs, peer authentication,
signatures, identity, synthetic jobs and the model-substitution check.

Domain code only (no Ray): the Serve apps, actors and CLI wire these in. The verification
entry points (imported on first use, so ``cluster.auth.receipts`` & co. stay light)::

    from cluster.honesty import build_references, run_verification
    from cluster.nodes.policy import EndpointGuard
    from cluster.reports.honesty import format_verdicts

    references = build_references(settings.honesty, reference_http)  # claimed model -> reference
    guard = EndpointGuard.of(settings.requester.endpoint_allowlist)  # the nodes' endpoint policy
    verdicts = await run_verification(settings.honesty, nodes, references, guard=guard,
                                      store=stores.verdicts)
    print(format_verdicts(verdicts))

The loop runs rounds by itself (``cluster/honesty/schedule.py`` decides who is due within the
traffic budget, ``verify_nodes`` records a round with its traffic and evasion verdicts) and
audits registered streaming jobs (``cluster/honesty/job_audits.py``); see
``docs/architecture.md``, "The loop's honesty steps".

See ``cluster/honesty/README.md`` for the rules, the calibrated thresholds and the limits.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.honesty.reference import ServeReference, TransformersReference, TrustedReference
    from cluster.honesty.traffic import TrafficReport, traffic_report, verification_due
    from cluster.honesty.verdicts import Outcome, Verdict
    from cluster.honesty.verification import (
        NodeTarget,
        RoundReport,
        Verifier,
        build_references,
        latest_verdicts,
        record_verdicts,
        run_verification,
        verify_nodes,
        verify_registered_nodes,
    )

_EXPORTS: dict[str, str] = {
    "ServeReference": "cluster.honesty.reference",
    "TransformersReference": "cluster.honesty.reference",
    "TrustedReference": "cluster.honesty.reference",
    "TrafficReport": "cluster.honesty.traffic",
    "traffic_report": "cluster.honesty.traffic",
    "verification_due": "cluster.honesty.traffic",
    "Outcome": "cluster.honesty.verdicts",
    "Verdict": "cluster.honesty.verdicts",
    "NodeTarget": "cluster.honesty.verification",
    "RoundReport": "cluster.honesty.verification",
    "Verifier": "cluster.honesty.verification",
    "build_references": "cluster.honesty.verification",
    "latest_verdicts": "cluster.honesty.verification",
    "record_verdicts": "cluster.honesty.verification",
    "run_verification": "cluster.honesty.verification",
    "verify_nodes": "cluster.honesty.verification",
    "verify_registered_nodes": "cluster.honesty.verification",
}

__all__ = [
    "NodeTarget",
    "Outcome",
    "RoundReport",
    "ServeReference",
    "TrafficReport",
    "TransformersReference",
    "TrustedReference",
    "Verdict",
    "Verifier",
    "build_references",
    "latest_verdicts",
    "record_verdicts",
    "run_verification",
    "traffic_report",
    "verification_due",
    "verify_nodes",
    "verify_registered_nodes",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
