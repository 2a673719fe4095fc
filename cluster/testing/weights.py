"""Weight alterations the cheater zoo applies to an honest model (in place, seeded).

- :func:`perturb_weights`: a *different model* of the same shape: every tensor gets seeded
  gaussian noise of ``relative`` times its own RMS (a stand-in for "another fine-tune").
- :func:`requantize_int8`: a *re-quantized* model: every linear layer of the decoder blocks
  round-tripped through symmetric int8 with one scale per output channel, the common
  weight-only scheme (W8A16) of cheap serving stacks. Embeddings (tied to the LM head here)
  and norms stay float32, as those stacks keep them.
- :func:`round_trip_bfloat16`: every tensor through bfloat16 (8 bits of mantissa), the
  precision most GPU deployments serve in.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

INT8_MAX = 127


@torch.no_grad()
def perturb_weights(model: PreTrainedModel, relative: float, seed: int) -> None:
    """Add N(0, (relative * rms(tensor))²) noise to every parameter, in name order."""
    if relative < 0:
        raise ValueError(f"relative noise must be >= 0, got {relative}")
    generator = torch.Generator().manual_seed(int(seed))
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        rms = param.detach().float().pow(2).mean().sqrt()
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        param.add_((noise * (relative * rms)).to(param.dtype))


def _decoder_linears(model: PreTrainedModel) -> list[nn.Linear]:
    """Linear layers inside the decoder blocks (not the LM head, tied to the embeddings)."""
    head = model.get_output_embeddings()
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and ".layers." in f".{name}."]


@torch.no_grad()
def requantize_int8(model: PreTrainedModel) -> int:
    """Round-trip decoder linear weights through per-output-channel int8; returns how many."""
    layers = _decoder_linears(model)
    for layer in layers:
        weight = layer.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / INT8_MAX
        quantized = torch.clamp(torch.round(weight / scale), -INT8_MAX, INT8_MAX)
        layer.weight.copy_((quantized * scale).to(layer.weight.dtype))
    return len(layers)


@torch.no_grad()
def round_trip_bfloat16(model: PreTrainedModel) -> None:
    """Round every parameter to bfloat16 and back (float32 storage, bf16 values)."""
    for param in model.parameters():
        param.copy_(param.detach().to(torch.bfloat16).to(param.dtype))
