"""The validator's sampling and binomial test, in seeded trials against the binomial model.

Fakers fake each claimed nonce independently with probability q, so the number of fakes
in a 200-nonce sample is Binomial(200, q); with one stage the flag rate the model predicts
is P(Binomial(200, q) >= k*), k* the fewest mismatches the test calls fraud. The default
validation is sequential (a second sample of 800 when the first shows a mismatch without
convicting); its flag rate is the exact two-stage sum
(``cluster/poc/binomial.py::sequential_conviction_probability``).
"""

from __future__ import annotations

import math
import random

import pytest
from pydantic import ValidationError

from cluster.poc.binomial import (
    binomial_tail,
    binomial_tail_exact,
    critical_count,
    flag_probability,
    sequential_conviction_probability,
)
from cluster.poc.calibration import calibrate_r_target
from cluster.poc.compute import PocComputer, configure_torch
from cluster.poc.config import PocModelParams, PocRoundParams, ValidationConfig
from cluster.poc.validator import ClaimedProof, PocValidator, judge

pytestmark = pytest.mark.usefixtures("torch_settings_restored")

SEED = "block-0x5eed"
MODEL = PocModelParams(dim=32, n_layers=2, n_heads=4, vocab_size=1024, seq_len=8, out_dim=32)
NODE_KEY = "ed25519:node-under-test"
CLAIM_SIZE = 1000
TRIALS = 100


@pytest.fixture(scope="module")
def computer() -> PocComputer:
    configure_torch(1)
    r_target = calibrate_r_target(SEED, MODEL, valid_fraction=0.25, n_nonces=2048)
    params = PocRoundParams(seed=SEED, model=MODEL, r_target=r_target, batch_size=200)
    return PocComputer(params, NODE_KEY)


@pytest.fixture(scope="module")
def honest_claim(computer: PocComputer) -> ClaimedProof:
    nonces, dist = computer.find_valid(range(CLAIM_SIZE * 6))
    assert len(nonces) >= CLAIM_SIZE
    return ClaimedProof(node_id="n1", public_key=NODE_KEY,
                        nonces=nonces[:CLAIM_SIZE], distances=dist[:CLAIM_SIZE])


@pytest.fixture(scope="module")
def validator(computer: PocComputer) -> PocValidator:
    return PocValidator(computer.with_key("validator"), ValidationConfig(), clock=lambda: 1.0)


def corrupt(claim: ClaimedProof, rate: float, rng: random.Random, r_target: float,
            kind: str) -> ClaimedProof:
    """Each entry independently: a fake (never computed) or a hardware flip, with prob ``rate``."""
    nonces, dist = list(claim.nonces), list(claim.distances)
    for i in range(len(nonces)):
        if rng.random() < rate:
            if kind == "fake":  # a nonce the node never computed, claimed valid
                nonces[i] = 10**9 + rng.randrange(10**9)
                dist[i] = rng.uniform(r_target - 0.05, r_target)
            else:  # an honest float disagreement that crosses the boundary
                dist[i] = math.nextafter(dist[i], 3.0) + 2e-5
    return claim.model_copy(update={"nonces": nonces, "distances": dist})


def flag_rate(validator: PocValidator, claim: ClaimedProof, rate: float, kind: str,
              seed: int) -> tuple[float, float]:
    """(share of trials flagged, mean sampled mismatch rate) over TRIALS seeded trials."""
    rng = random.Random(seed)
    flagged, mismatch = 0, 0.0
    r_target = validator._computer.r_target  # noqa: SLF001 - test helper
    for t in range(TRIALS):
        trial_claim = corrupt(claim, rate, rng, r_target, kind) if rate else claim
        verdict = validator.validate(trial_claim, sample_seed=seed * 1000 + t)
        flagged += verdict.fraud
        mismatch += verdict.mismatch_rate
    return flagged / TRIALS, mismatch / TRIALS


def conviction_model(cfg: ValidationConfig, rate: float) -> float:
    return sequential_conviction_probability(cfg.sample_size, cfg.second_sample_size,
                                             cfg.escalate_at, rate, cfg.honest_mismatch_rate,
                                             cfg.p_value_threshold)


def report(capsys: pytest.CaptureFixture[str], label: str, measured: float, model: float,
           mismatch: float) -> None:
    with capsys.disabled():
        print(f"\n  poc {label:<34} flagged {measured:6.1%} in {TRIALS} trials   "
              f"binomial model {model:8.3%}   sampled mismatch rate {mismatch:.4f}")


def test_exact_binomial_tail_matches_scipy() -> None:
    import scipy.stats as scipy_stats
    for k, n, p in [(0, 200, 5e-4), (1, 200, 5e-4), (5, 200, 5e-4), (20, 200, 0.1),
                    (3, 10, 0.5), (200, 200, 0.3), (7, 1000, 1e-3)]:
        want = scipy_stats.binomtest(k, n, p, alternative="greater").pvalue
        assert binomial_tail_exact(k, n, p) == pytest.approx(want, rel=1e-9, abs=1e-300)
        assert binomial_tail(k, n, p) == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_defaults_flag_five_mismatches_in_two_hundred() -> None:
    cfg = ValidationConfig()
    assert (cfg.sample_size, cfg.honest_mismatch_rate, cfg.p_value_threshold) == (200, 5e-4, 1e-7)
    assert critical_count(200, 5e-4, 1e-7) == 5
    assert flag_probability(200, 0.10, 5e-4, 1e-7) > 0.9999
    assert flag_probability(200, 5e-4, 5e-4, 1e-7) < 1e-7


def test_honest_node_is_never_flagged_in_100_trials(
    validator: PocValidator, honest_claim: ClaimedProof, capsys: pytest.CaptureFixture[str]
) -> None:
    measured, mismatch = flag_rate(validator, honest_claim, 0.0, "fake", seed=1)
    report(capsys, "honest, same hardware", measured, 0.0, mismatch)
    assert measured == 0.0 and mismatch == 0.0


def test_honest_node_on_other_hardware_is_never_flagged(
    validator: PocValidator, honest_claim: ClaimedProof, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = validator.config
    rate = cfg.honest_mismatch_rate
    measured, mismatch = flag_rate(validator, honest_claim, rate, "flip", seed=2)
    model = conviction_model(cfg, rate)
    report(capsys, f"honest, flips at {rate:g}", measured, model, mismatch)
    assert measured == 0.0


def test_node_faking_10_percent_is_flagged_in_99_percent_of_trials(
    validator: PocValidator, honest_claim: ClaimedProof, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = validator.config
    measured, mismatch = flag_rate(validator, honest_claim, 0.10, "fake", seed=3)
    model = conviction_model(cfg, 0.10)
    report(capsys, "faking 10%", measured, model, mismatch)
    assert measured >= 0.99
    assert mismatch == pytest.approx(0.10, abs=0.015)


@pytest.mark.parametrize("fake_rate", [0.01, 0.02, 0.03])
def test_flag_rate_agrees_with_the_binomial_model(
    validator: PocValidator, honest_claim: ClaimedProof, capsys: pytest.CaptureFixture[str],
    fake_rate: float,
) -> None:
    cfg = validator.config
    measured, mismatch = flag_rate(validator, honest_claim, fake_rate, "fake",
                                   seed=int(fake_rate * 1000))
    model = conviction_model(cfg, fake_rate)
    report(capsys, f"faking {fake_rate:.0%}", measured, model, mismatch)
    sd = math.sqrt(model * (1 - model) / TRIALS)
    assert abs(measured - model) <= 4 * sd + 0.01


def test_sequential_validation_convicts_a_2_percent_faker_and_almost_never_an_honest_node(
    validator: PocValidator, honest_claim: ClaimedProof,
) -> None:
    cfg = validator.config
    assert conviction_model(cfg, 0.02) >= 0.95  # 0.982; one stage of 200: 0.371
    assert flag_probability(cfg.sample_size, 0.02, cfg.honest_mismatch_rate,
                            cfg.p_value_threshold) < 0.4
    assert conviction_model(cfg, cfg.honest_mismatch_rate) <= 1e-6  # 1.2e-7
    # a 2% faker caught in its first 200 only by the second stage: the verdict says so
    rng = random.Random(20)
    r_target = validator._computer.r_target  # noqa: SLF001 - test helper
    for t in range(50):
        verdict = validator.validate(corrupt(honest_claim, 0.02, rng, r_target, "fake"), t)
        if verdict.stages == 2 and verdict.fraud:
            break
    else:
        pytest.fail("no round needed the second stage to convict")
    assert verdict.n_first_stage == 200 and 1 <= verdict.first_stage_mismatches < 5
    assert verdict.n_sampled == 1000 and "second sample after" in verdict.to_record().reason
    single = PocValidator(validator._computer, cfg.model_copy(  # noqa: SLF001 - test helper
        update={"second_sample_size": 0}))
    assert single.validate(honest_claim, 0).n_sampled == 200


def test_verdict_is_a_complete_stored_verdict(
    validator: PocValidator, honest_claim: ClaimedProof
) -> None:
    fake = corrupt(honest_claim, 0.5, random.Random(9), validator._computer.r_target, "fake")  # noqa: SLF001
    verdict = validator.validate(fake, sample_seed=42)
    record = verdict.to_record()
    assert record.verdict_id == verdict.verdict_id and record.check == "poc"
    ev = record.evidence
    assert verdict.fraud is True and record.outcome == "fail" and ev["p_value"] < 1e-7
    assert ev["n_sampled"] == 200 and ev["n_mismatch"] == verdict.n_mismatch > 50
    assert len(ev["mismatches"]) == ValidationConfig().max_evidence
    assert {m["reason"] for m in ev["mismatches"]} <= {"distance_differs", "not_below_r_target"}
    assert ev["weights_sha256"] and ev["sampled_nonces_sha256"]
    # replayable: the same sample seed samples and decides the same
    again = validator.validate(fake, sample_seed=42).to_record()
    again.evidence["validation_s"] = ev["validation_s"]  # the only timing field
    assert again == record


def test_small_claims_are_sampled_whole_and_duplicates_reported(
    validator: PocValidator, honest_claim: ClaimedProof
) -> None:
    nonces = honest_claim.nonces[:10] + honest_claim.nonces[:3]
    dist = honest_claim.distances[:10] + honest_claim.distances[:3]
    claim = ClaimedProof(node_id="n1", public_key=NODE_KEY, nonces=nonces, distances=dist)
    verdict = validator.validate(claim, sample_seed=0)
    assert (verdict.n_claimed, verdict.n_unique, verdict.n_sampled) == (13, 10, 10)
    assert verdict.evidence.duplicate_nonces == 3 and not verdict.fraud
    empty = ClaimedProof(node_id="n1", public_key=NODE_KEY, nonces=[], distances=[])
    assert validator.validate(empty, sample_seed=0).p_value == 1.0


def test_judge_names_each_kind_of_mismatch() -> None:
    cfg = ValidationConfig(distance_tolerance=1e-6)
    result = judge([1, 2, 3, 4], [0.5, 0.5, 0.9, 0.5], [0.5, 0.6, 0.9, 0.8], 0.7, cfg)
    assert [(m.nonce, m.reason) for m in result.mismatches] == [
        (2, "distance_differs"), (3, "claimed_not_below_r_target"), (4, "distance_differs")]
    result = judge([5], [0.69], [0.7], 0.7, ValidationConfig(distance_tolerance=0.1))
    assert result.mismatches[0].reason == "not_below_r_target"


def test_claims_must_pair_nonces_with_distances() -> None:
    with pytest.raises(ValidationError, match="one per nonce"):
        ClaimedProof(node_id="n", public_key="k", nonces=[1, 2], distances=[0.1])
