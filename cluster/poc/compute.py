"""Nonces to distances: the work a node proves and a validator recomputes.

For a nonce, the input tokens come from shake256(seed, node public key, nonce), so a
proof found for one key (or one seed) is worthless for another. The model's output is
normalised to the unit sphere and compared with a unit target vector drawn from the
seed; the nonce is valid when the Euclidean distance is below ``r_target``.

Bit reproducibility on one kind of hardware and dtype: float32 throughout, weights drawn
on the CPU, a fixed forward-pass shape (every batch is padded to ``batch_size`` rows, so
a nonce's distance does not depend on which nonces share its batch), and a fixed torch
thread count set by :func:`configure_torch` in each process that computes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch

from cluster.poc.config import PocRoundParams
from cluster.poc.model import PocTransformer, build_model, seed_int, weights_digest

INPUT_DOMAIN = b"testbench-poc-input-v1"
TARGET_DOMAIN = b"testbench-poc-target-v1"
MAX_NONCE = (1 << 64) - 1


def configure_torch(threads: int | None = None) -> None:
    """Deterministic kernels, true float32 and a fixed intra-op thread count for this process.

    On GPUs: cuBLAS needs a fixed workspace to be deterministic (set before CUDA starts),
    and TF32 would silently round float32 matmuls to 10-bit mantissas.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    if threads is not None:
        torch.set_num_threads(threads)


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def derive_tokens(
    seed: str, public_key: str, nonces: Sequence[int], seq_len: int, vocab_size: int
) -> torch.Tensor:
    """Token ids [len(nonces), seq_len] (int64) from shake256(seed, key, nonce)."""
    prefix = hashlib.shake_256(_length_prefixed(INPUT_DOMAIN, seed.encode(), public_key.encode()))
    width = 4 * seq_len
    buf = bytearray(width * len(nonces))
    for i, nonce in enumerate(nonces):
        if not 0 <= nonce <= MAX_NONCE:
            raise ValueError(f"nonce {nonce} is outside [0, 2**64)")
        h = prefix.copy()
        h.update(nonce.to_bytes(8, "big"))
        buf[i * width:(i + 1) * width] = h.digest(width)
    words = np.frombuffer(bytes(buf), dtype=">u4").astype(np.int64) % vocab_size
    return torch.from_numpy(words).view(len(nonces), seq_len)


def target_vector(seed: str, out_dim: int) -> torch.Tensor:
    """The round's unit target vector (float32, CPU)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed_int(TARGET_DOMAIN, seed.encode(), str(out_dim).encode()))
    v = torch.randn(out_dim, generator=gen, dtype=torch.float32)
    return v / torch.linalg.vector_norm(v)


class PocComputer:
    """The round's model bound to one node's public key."""

    def __init__(
        self,
        params: PocRoundParams,
        public_key: str,
        device: str = "cpu",
        model: PocTransformer | None = None,
    ) -> None:
        if not public_key:
            raise ValueError("public_key must not be empty")
        self.params = params
        self.public_key = public_key
        self.device = device
        self.model = model if model is not None else build_model(params.seed, params.model, device)
        self.target = target_vector(params.seed, params.model.out_dim).to(device)

    def with_key(self, public_key: str) -> PocComputer:
        """The same round's model (shared, not rebuilt) for another node's key."""
        return PocComputer(self.params, public_key, self.device, model=self.model)

    @property
    def r_target(self) -> float:
        return self.params.r_target

    def weights_digest(self) -> str:
        return weights_digest(self.model)

    def tokens(self, nonces: Sequence[int]) -> torch.Tensor:
        m = self.params.model
        return derive_tokens(self.params.seed, self.public_key, nonces, m.seq_len, m.vocab_size)

    def compute_vectors(self, nonces: Sequence[int]) -> torch.Tensor:
        """Unit output vectors [len(nonces), out_dim] (float32, CPU)."""
        bs = self.params.batch_size
        tokens = self.tokens(nonces)
        out = []
        with torch.inference_mode():
            for start in range(0, len(nonces), bs):
                chunk = tokens[start:start + bs]
                n = chunk.shape[0]
                if n < bs:  # pad to the fixed shape: same kernels, same bits
                    chunk = torch.cat([chunk, chunk.new_zeros(bs - n, chunk.shape[1])])
                y = self.model(chunk.to(self.device))[:n]
                out.append((y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)).cpu())
        if not out:
            return torch.empty(0, self.params.model.out_dim, dtype=torch.float32)
        return torch.cat(out)

    def compute_distances(self, nonces: Sequence[int]) -> torch.Tensor:
        """Distances [len(nonces)] (float32, CPU) of each nonce's vector to the target."""
        vectors = self.compute_vectors(nonces)
        return torch.linalg.vector_norm(vectors - self.target.cpu(), dim=-1)

    def find_valid(self, nonces: Sequence[int]) -> tuple[list[int], list[float]]:
        """The nonces below ``r_target`` and their distances."""
        dist = self.compute_distances(nonces)
        mask = (dist.double() < self.params.r_target).tolist()  # the validator's float64 rule
        values = dist.tolist()
        kept = [i for i, ok in enumerate(mask) if ok]
        return [nonces[i] for i in kept], [values[i] for i in kept]
