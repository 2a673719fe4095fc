"""Proof of compute at low fraud rates: how often the validator convicts a node that fakes a
share of its nonces, and how often an honest one.

Simulated rounds on the real seeded PoC model (small parameters): an honest claim of
``--claim`` valid nonces is computed once; each round every claimed nonce is independently
replaced by a fake (a nonce never computed, claimed just below ``r_target``) with
probability ``share``, and the validator recomputes its sample and judges. Two validators
judge the same rounds:

- the anchor: one stage of 200 nonces, convicted at p < 1e-7 (MLNode v1; what testbench did
  before the sequential stage);
- the default (``cluster/poc/config.py::ValidationConfig``): the same first stage, then 800
  more nonces when the first 200 show a mismatch without convicting, the test applied to
  all of them.

Beside each simulated rate the exact probability (``cluster/poc/binomial.py``) and the mean
number of nonces recomputed. Honest nodes: the same hardware (no mismatch) in simulation,
and the computed false-conviction probability at the honest mismatch rate 5e-4 (hardware
differences near ``r_target``), plus simulated rounds with such flips.

    .venv/bin/python bench/poc_power.py [--rounds 400] [--claim 2000]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.poc.binomial import (  # noqa: E402
    sequential_conviction_probability,
    sequential_expected_checks,
)
from cluster.poc.calibration import calibrate_r_target  # noqa: E402
from cluster.poc.compute import PocComputer, configure_torch  # noqa: E402
from cluster.poc.config import PocModelParams, PocRoundParams, ValidationConfig  # noqa: E402
from cluster.poc.validator import ClaimedProof, PocValidator  # noqa: E402

KEY = "bench-node-public-key"
SHARES = (0.01, 0.02, 0.05)
GOAL_POWER = 0.95
GOAL_FALSE = 1e-6


def corrupt(claim: ClaimedProof, share: float, rng: random.Random, r_target: float,
            flip_rate: float) -> ClaimedProof:
    """Each nonce faked with probability ``share``; each honest one flipped across the
    boundary (an honest hardware disagreement) with probability ``flip_rate``."""
    nonces, dist = list(claim.nonces), list(claim.distances)
    for i in range(len(nonces)):
        u = rng.random()
        if u < share:
            nonces[i] = 10**12 + rng.randrange(10**12)
            dist[i] = rng.uniform(r_target - 0.05, r_target)
        elif u < share + flip_rate:
            dist[i] = math.nextafter(dist[i], 3.0) + 2e-5
    return claim.model_copy(update={"nonces": nonces, "distances": dist})


def model(cfg: ValidationConfig, rate: float) -> tuple[float, float]:
    """(conviction probability, expected nonces checked) of ``cfg`` at a mismatch rate."""
    args = (cfg.sample_size, cfg.second_sample_size, cfg.escalate_at, rate,
            cfg.honest_mismatch_rate, cfg.p_value_threshold)
    return sequential_conviction_probability(*args), sequential_expected_checks(*args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=400, help="simulated rounds per setting")
    ap.add_argument("--claim", type=int, default=2000, help="valid nonces an honest node claims")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    configure_torch(1)
    params_model = PocModelParams(dim=32, n_layers=2, n_heads=4, vocab_size=1024, seq_len=8,
                                  out_dim=32)
    seed = "bench-power-seed"
    r_target = calibrate_r_target(seed, params_model, valid_fraction=0.25, n_nonces=4096)
    params = PocRoundParams(seed=seed, model=params_model, r_target=r_target, batch_size=200)
    node = PocComputer(params, KEY)
    started = time.perf_counter()
    nonces, dist = node.find_valid(range(args.claim * 8))
    if len(nonces) < args.claim:
        raise SystemExit(f"only {len(nonces)} valid nonces; raise the search range")
    honest = ClaimedProof(node_id="bench", public_key=KEY, nonces=nonces[:args.claim],
                          distances=dist[:args.claim])
    sequential = ValidationConfig()
    single = sequential.model_copy(update={"second_sample_size": 0})
    validators = {"one stage": PocValidator(PocComputer(params, "validator"), single),
                  "sequential": PocValidator(PocComputer(params, "validator"), sequential)}
    print(f"poc power: model {params_model.model_dump()}, claim {args.claim} nonces "
          f"(computed in {time.perf_counter() - started:.1f} s), {args.rounds} rounds per row; "
          f"honest mismatch rate {sequential.honest_mismatch_rate:g}, p < "
          f"{sequential.p_value_threshold:g}; sequential = {sequential.sample_size} + "
          f"{sequential.second_sample_size} when >= {sequential.escalate_at} mismatch")
    print(f"{'node':<26}{'design':<12}{'convicted':>11}{'computed':>11}{'nonces/round':>14}"
          f"{'computed':>10}")
    rows = [("honest, same hardware", 0.0, 0.0),
            (f"honest, flips at {sequential.honest_mismatch_rate:g}", 0.0,
             sequential.honest_mismatch_rate)]
    rows += [(f"faking {share:.0%}", share, 0.0) for share in SHARES]
    measured: dict[tuple[str, str], float] = {}
    rng = random.Random(args.seed)
    validation_s = 0.0
    for label, share, flips in rows:
        claims = [corrupt(honest, share, rng, r_target, flips) for _ in range(args.rounds)]
        for design, validator in validators.items():
            t0 = time.perf_counter()
            verdicts = [validator.validate(c, sample_seed=args.seed * 10**6 + i)
                        for i, c in enumerate(claims)]
            validation_s += time.perf_counter() - t0
            rate = sum(v.fraud for v in verdicts) / len(verdicts)
            checked = sum(v.n_sampled for v in verdicts) / len(verdicts)
            cfg = validator.config
            p_model, n_model = model(cfg, share + flips)
            measured[(label, design)] = rate
            print(f"{label:<26}{design:<12}{rate:>10.1%} {p_model:>10.3%} {checked:>13.0f} "
                  f"{n_model:>9.0f}")
    false_seq, checks_seq = model(sequential, sequential.honest_mismatch_rate)
    false_one, _ = model(single, single.honest_mismatch_rate)
    print(f"honest false conviction at mismatch rate {sequential.honest_mismatch_rate:g} "
          f"(computed, exact): sequential {false_seq:.3g}, one stage {false_one:.3g}; "
          f"validation wall time {validation_s:.1f} s")
    from bench_results import report

    for share in SHARES:
        label = f"faking {share:.0%}"
        seq, one = measured[(label, "sequential")], measured[(label, "one stage")]
        goal = f">= {GOAL_POWER:.0%}" if share == 0.02 else "reported"
        report("poc_power.py", f"rounds convicting a node faking {share:.0%} of nonces "
               f"(sequential, {args.rounds} simulated)", f"{seq:.1%} (exact {model(sequential, share)[0]:.1%})",
               f"one stage of 200: {one:.1%} (exact {model(single, share)[0]:.1%})",
               f"{seq / one:.2f}x" if one else "n/a", goal,
               seq >= GOAL_POWER if share == 0.02 else True)
    honest_rounds = [measured[(label, "sequential")] for label, _, _ in rows[:2]]
    report("poc_power.py", "honest false conviction per round",
           f"{false_seq:.2g} computed, {sum(honest_rounds):.0%} of {2 * args.rounds} simulated",
           f"one stage of 200: {false_one:.2g} computed", f"{false_seq / false_one:.2f}x",
           f"<= {GOAL_FALSE:g} and 0 simulated",
           false_seq <= GOAL_FALSE and sum(honest_rounds) == 0)
    report("poc_power.py", "nonces recomputed per honest node (sequential, expected)",
           f"{checks_seq:.0f}", f"one stage: {single.sample_size}",
           f"{checks_seq / single.sample_size:.2f}x", "reported", True)


if __name__ == "__main__":
    main()
