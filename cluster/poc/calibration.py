"""Pick ``r_target`` so that a wanted fraction of nonces is valid.

The distance distribution depends only on the seed and the model shape, so a network
calibrates once per (seed, params) on a calibration key nobody mines with, and publishes
the radius with the round.
"""

from __future__ import annotations

import torch

from cluster.poc.compute import PocComputer
from cluster.poc.config import PocModelParams, PocRoundParams

CALIBRATION_KEY = "testbench-poc-calibration"


def calibrate_r_target(
    seed: str,
    model: PocModelParams,
    valid_fraction: float,
    n_nonces: int = 4096,
    batch_size: int = 64,
    public_key: str = CALIBRATION_KEY,
) -> float:
    """The ``valid_fraction`` quantile of distances over ``n_nonces`` nonces."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if n_nonces < 2:
        raise ValueError("n_nonces must be at least 2")
    # r_target is not used for distances; any admissible value builds the computer.
    params = PocRoundParams(seed=seed, model=model, r_target=2.0, batch_size=batch_size)
    dist = PocComputer(params, public_key).compute_distances(range(n_nonces))
    return float(torch.quantile(dist.double(), valid_fraction))
