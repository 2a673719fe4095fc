"""Weight alterations the cheater zoo applies to an honest model (in place, seeded).

- :func:`perturb_weights`: a *different model* of the same shape: every tensor gets seeded
  gaussian noise of ``relative`` times its own RMS (a stand-in for "another fine-tune").
- :func:`requantize_int8`: a *re-quantized* model: every linear layer of the decoder blocks
  round-tripped through symmetric int8 with one scale per output channel, the common
  weight-only scheme (W8A16) of cheap serving stacks. Embeddings (tied to the LM head here)
  and norms stay float32, as those stacks keep them.
- :func:`round_trip_bfloat16`: every tensor through bfloat16 (8 bits of mantissa), the
  precision most GPU deployments serve in.
- :func:`drop_layers`: a *cheaper model*: every other decoder layer removed (half the
  compute per token), what the zoo's laundering, probe-aware, temperature-aware and
  sometimes-cheating nodes serve instead of the claimed model.
- :func:`keep_every_other_layer`: a *cheaper model*: decoder blocks 0, 2, 4, ... kept, the
  others dropped (half the compute of a forward pass, same tokenizer and head).
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


@torch.no_grad()
def keep_every_other_layer(model: PreTrainedModel) -> int:
    """Drop the odd decoder blocks (in place); returns how many blocks are left."""
    decoder = model.get_decoder()
    kept = list(decoder.layers)[::2]
    for index, layer in enumerate(kept):
        for module in layer.modules():  # the KV cache is indexed by each attention's layer_idx
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    decoder.layers = nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[::2]
    return len(kept)


@torch.no_grad()
def drop_layers(model: PreTrainedModel, keep_every: int = 2) -> int:
    """Keep decoder layers 0, ``keep_every``, 2 * ``keep_every``, ... and drop the others
    (renumbered for the KV cache); returns how many are left."""
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    decoder = model.get_decoder()
    kept = [layer for i, layer in enumerate(decoder.layers) if i % keep_every == 0]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
    decoder.layers = nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types:
        model.config.layer_types = list(layer_types)[: len(kept)]
    return len(kept)
