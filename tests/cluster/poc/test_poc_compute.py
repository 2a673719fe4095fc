"""The seeded PoC computation: determinism, key/seed binding, calibration."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from cluster.poc.calibration import calibrate_r_target
from cluster.poc.compute import PocComputer, configure_torch, derive_tokens
from cluster.poc.config import PocModelParams, PocRoundParams, ValidationConfig
from cluster.poc.model import build_model, weights_digest
from cluster.poc.validator import ClaimedProof, PocValidator

pytestmark = pytest.mark.usefixtures("torch_settings_restored")

SEED = "0x" + "ab" * 32
MODEL = PocModelParams(dim=32, n_layers=2, n_heads=4, vocab_size=1024, seq_len=8, out_dim=32)
KEY_A = "node-a-public-key"
KEY_B = "node-b-public-key"


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    configure_torch(1)


@pytest.fixture(scope="module")
def r_target() -> float:
    return calibrate_r_target(SEED, MODEL, valid_fraction=0.2, n_nonces=2048, batch_size=64)


def round_params(r_target: float, seed: str = SEED, model: PocModelParams = MODEL,
                 batch_size: int = 64) -> PocRoundParams:
    return PocRoundParams(seed=seed, model=model, r_target=r_target, batch_size=batch_size)


def test_same_seed_and_params_give_bit_identical_weights() -> None:
    a, b = build_model(SEED, MODEL), build_model(SEED, MODEL)
    assert weights_digest(a) == weights_digest(b)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_seed_or_shape_change_gives_other_weights() -> None:
    base = weights_digest(build_model(SEED, MODEL))
    assert weights_digest(build_model(SEED + "1", MODEL)) != base
    assert weights_digest(build_model(SEED, MODEL.model_copy(update={"n_layers": 3}))) != base


def test_same_inputs_give_bit_identical_distances_across_instances(r_target: float) -> None:
    nonces = list(range(300))
    d1 = PocComputer(round_params(r_target), KEY_A).compute_distances(nonces)
    d2 = PocComputer(round_params(r_target), KEY_A).compute_distances(nonces)
    assert d1.dtype == torch.float32
    assert torch.equal(d1, d2)
    assert bool(((d1 >= 0) & (d1 <= 2)).all())


def test_a_nonce_distance_does_not_depend_on_its_batch(r_target: float) -> None:
    computer = PocComputer(round_params(r_target), KEY_A)
    full = computer.compute_distances(list(range(200)))
    picked = [199, 3, 64, 65, 130]
    alone = computer.compute_distances(picked)
    assert torch.equal(full[picked], alone)
    for n in picked:
        assert torch.equal(computer.compute_distances([n]), full[[n]])


def test_inputs_depend_on_seed_key_and_nonce() -> None:
    base = derive_tokens(SEED, KEY_A, [7], 8, 1024)
    assert base.shape == (1, 8) and base.dtype == torch.int64
    assert torch.equal(base, derive_tokens(SEED, KEY_A, [7], 8, 1024))
    assert not torch.equal(base, derive_tokens(SEED, KEY_B, [7], 8, 1024))
    assert not torch.equal(base, derive_tokens(SEED + "x", KEY_A, [7], 8, 1024))
    assert not torch.equal(base, derive_tokens(SEED, KEY_A, [8], 8, 1024))
    with pytest.raises(ValueError, match="outside"):
        derive_tokens(SEED, KEY_A, [-1], 8, 1024)


def test_calibrated_radius_gives_the_wanted_valid_fraction(r_target: float) -> None:
    computer = PocComputer(round_params(r_target), KEY_A)  # another key than calibration's
    valid, dist = computer.find_valid(range(10_000, 14_000))
    assert 0.16 < len(valid) / 4000 < 0.24
    assert all(d < r_target for d in dist)


def _proof(computer: PocComputer, node_id: str, n: int = 400) -> ClaimedProof:
    nonces, dist = computer.find_valid(range(n * 6))
    return ClaimedProof(node_id=node_id, public_key=computer.public_key,
                        nonces=nonces[:n], distances=dist[:n])


def test_proofs_do_not_move_to_another_key_or_seed(r_target: float) -> None:
    cfg = ValidationConfig(sample_size=100)
    honest = _proof(PocComputer(round_params(r_target), KEY_A), "a")
    validator = PocValidator(PocComputer(round_params(r_target), "validator"), cfg)
    assert not validator.validate(honest, sample_seed=1).fraud

    stolen = honest.model_copy(update={"node_id": "b", "public_key": KEY_B})
    verdict = validator.validate(stolen, sample_seed=1)
    assert verdict.fraud and verdict.n_mismatch > 50

    next_round = PocValidator(PocComputer(round_params(r_target, seed=SEED + "-next"), "v"), cfg)
    verdict = next_round.validate(honest, sample_seed=1)
    assert verdict.fraud and verdict.n_mismatch > 50


def test_round_params_refuse_unknown_fields_and_bad_shapes() -> None:
    with pytest.raises(ValidationError):
        PocRoundParams.model_validate({"seed": "s", "r_target": 1.0, "extra": 1})
    with pytest.raises(ValidationError, match="multiple of n_heads"):
        PocModelParams(dim=30, n_heads=4)
