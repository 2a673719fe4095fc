"""Proof of compute: the seeded model, nonce distances, the validator.

Plain domain code, no Ray: the node's Ray workers live in ``serve_apps.poc``. Names are
re-exported lazily so that ``cluster.cli.poc`` (imported by every CLI command) does not
pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "binomial_tail": "binomial", "critical_count": "binomial", "flag_probability": "binomial",
    "calibrate_r_target": "calibration",
    "PocComputer": "compute", "configure_torch": "compute", "derive_tokens": "compute",
    "target_vector": "compute",
    "PocModelParams": "config", "PocRoundParams": "config", "ValidationConfig": "config",
    "build_model": "model", "weights_digest": "model",
    "ClaimedProof": "validator", "PocValidator": "validator", "Verdict": "validator",
    "judge": "validator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cluster.poc' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cluster.poc.{_EXPORTS[name]}"), name)
