"""DiLoCo's outer step and the pseudo-gradient payloads nodes exchange (plain torch)."""

from __future__ import annotations

import pickle

import pytest
import torch

from cluster.train.diloco import (
    Contribution,
    DilocoOuter,
    PayloadError,
    average,
    decode_payload,
    encode_payload,
)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_pseudo_gradient_is_global_minus_local_and_the_outer_step_is_nesterov_sgd() -> None:
    model = tiny_model()
    outer = DilocoOuter(model, outer_lr=0.7, momentum=0.9)
    start = {n: g.clone() for n, g in outer.global_state().items()}
    with torch.no_grad():  # H inner steps moved every local weight by -0.1
        for p in model.parameters():
            p.sub_(0.1)
    pseudo = outer.pseudo_gradient()
    assert all(torch.allclose(t, torch.full_like(t, 0.1)) for t in pseudo.values())
    for step in range(2):
        outer.step(pseudo)
        # torch's Nesterov SGD: buf = m*buf + g (buf = g at first); update = g + m*buf
        for n, g0 in start.items():
            buf = 0.1 if step == 0 else 0.9 * 0.1 + 0.1
            expected = g0 - 0.7 * (0.1 + 0.9 * buf)
            assert torch.allclose(outer.global_state()[n], expected, atol=1e-6)
            start[n] = outer.global_state()[n].clone()
        # the local model was reset to the new global parameters
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), outer.global_state()[n])


def test_payload_round_trips_as_safetensors_in_the_sync_dtype() -> None:
    outer = DilocoOuter(tiny_model(), 0.7, 0.9)
    shapes = {n: g.shape for n, g in outer.global_state().items()}
    pseudo = {n: torch.randn(s) for n, s in shapes.items()}
    data = encode_payload(pseudo, "float16", workers=3)
    assert data[8:].lstrip().startswith(b"{")  # a JSON header, not a pickle
    got = decode_payload("ab" * 32, data, shapes, "float16")
    assert got.workers == 3
    for n, t in pseudo.items():
        assert got.tensors[n].dtype == torch.float16
        assert torch.equal(got.tensors[n], t.to(torch.float16))


@pytest.mark.parametrize("problem", ["pickle", "shape", "names", "nan", "dtype", "workers"])
def test_a_payload_that_is_not_this_models_pseudo_gradient_is_refused(problem: str) -> None:
    outer = DilocoOuter(tiny_model(), 0.7, 0.9)
    shapes = {n: g.shape for n, g in outer.global_state().items()}
    good = {n: torch.zeros(s) for n, s in shapes.items()}
    name = next(iter(good))
    dtype, workers = "float16", 1
    if problem == "pickle":
        data = pickle.dumps(good)
    else:
        if problem == "shape":
            good[name] = torch.zeros(7)
        elif problem == "names":
            good["extra.weight"] = torch.zeros(1)
        elif problem == "nan":
            good[name] = torch.full(shapes[name], float("nan"))
        elif problem == "dtype":
            dtype = "bfloat16"
        elif problem == "workers":
            workers = 0
        data = encode_payload(good, dtype, workers)
    with pytest.raises(PayloadError):
        decode_payload("cd" * 32, data, shapes, "float16")


def test_average_is_worker_weighted_and_bit_identical_in_any_input_order() -> None:
    torch.manual_seed(1)
    contributions = [Contribution(sender=f"{i:064x}", workers=w,
                                  tensors={"w": torch.randn(5, 5).to(torch.float16)})
                     for i, w in enumerate([1, 2, 3])]
    a = average(contributions)["w"]
    b = average(list(reversed(contributions)))["w"]
    assert torch.equal(a, b)  # every node gets the same bits, whatever order messages came in
    expected = sum(c.workers * c.tensors["w"].float() for c in contributions) / 6
    assert torch.allclose(a, expected, atol=1e-6)
