"""The seeded transformer: every weight is drawn from (public seed, model parameters).

Each parameter tensor gets its own generator, seeded from sha256(seed, parameter
fingerprint, tensor name), so adding a layer or reordering modules never shifts the
other tensors' values. Weights are drawn on the CPU in float32 and moved afterwards, so
every device starts from identical bits.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from cluster.poc.config import PocModelParams

WEIGHT_DOMAIN = b"testbench-poc-weights-v1"


def seed_int(*parts: bytes) -> int:
    """A 63-bit generator seed from the sha256 of length-prefixed parts."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return int.from_bytes(h.digest()[:8], "big") & ((1 << 63) - 1)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention, written out so its kernels are explicit."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PocTransformer(nn.Module):
    """Tokens [batch, seq_len] -> un-normalised output vectors [batch, out_dim]."""

    def __init__(self, params: PocModelParams) -> None:
        super().__init__()
        self.params = params
        self.embed = nn.Embedding(params.vocab_size, params.dim)
        self.pos = nn.Parameter(torch.zeros(params.seq_len, params.dim))
        self.blocks = nn.ModuleList(
            Block(params.dim, params.n_heads, params.ffn_mult) for _ in range(params.n_layers)
        )
        self.norm = nn.LayerNorm(params.dim)
        self.head = nn.Linear(params.dim, params.out_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def _draw(name: str, shape: torch.Size, seed: str, fingerprint: str) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed_int(WEIGHT_DOMAIN, seed.encode(), fingerprint.encode(), name.encode()))
    if name.endswith(".bias"):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
    if len(shape) == 1:  # LayerNorm scales: around 1
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float32)
    if name == "embed.weight" or name == "pos":
        return torch.randn(shape, generator=gen, dtype=torch.float32)
    fan_in = shape[-1]
    return torch.randn(shape, generator=gen, dtype=torch.float32) / math.sqrt(fan_in)


def build_model(seed: str, params: PocModelParams, device: str = "cpu") -> PocTransformer:
    """The round's model, identical bit for bit for everyone with the same (seed, params)."""
    model = PocTransformer(params)
    fingerprint = params.fingerprint()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            tensor.copy_(_draw(name, tensor.shape, seed, fingerprint))
    model.requires_grad_(False)
    return model.eval().to(device)


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
