"""DiLoCo's outer step: global parameters, pseudo-gradients, their average, Nesterov SGD.

As in OpenDiLoCo and Gonka's ``zeroband/dist/diloco.py``: the global parameters are an
fp32 copy on the CPU; after H inner steps each worker's pseudo-gradient is
``global - local``; the average of every worker's pseudo-gradient is the gradient of an
SGD step with Nesterov momentum on the global parameters, which then replace the local
ones (the inner AdamW keeps its moments).

Between nodes the pseudo-gradients travel as safetensors bytes (never pickle) in
``sync_dtype``; each node's tensor is its workers' mean, weighted by its worker count, and
every node sums the same rounded tensors in the same (sorted sender key) order, so all
nodes apply bit-identical updates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cluster.core.errors import TestbenchError

PAYLOAD_FORMAT = "testbench-diloco-pseudo-gradient-v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PayloadError(TestbenchError):
    """A peer's pseudo-gradient does not fit this model (names, shapes, values)."""


@dataclass(frozen=True)
class Contribution:
    """One node's pseudo-gradient for one outer step and how many workers it averages."""

    sender: str
    workers: int
    tensors: dict[str, torch.Tensor]


class DilocoOuter:
    """The global parameters of one worker and the outer optimizer over them."""

    def __init__(self, model: torch.nn.Module, outer_lr: float, momentum: float) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self._local = [p for _, p in named]
        self.global_params = [torch.nn.Parameter(p.detach().to("cpu", torch.float32).clone())
                              for _, p in named]
        self.optimizer = torch.optim.SGD(self.global_params, lr=outer_lr, momentum=momentum,
                                         nesterov=True)

    @torch.no_grad()
    def pseudo_gradient(self) -> dict[str, torch.Tensor]:
        """``global - local`` for every parameter (fp32, CPU)."""
        return {n: g.detach() - p.detach().to("cpu", torch.float32)
                for n, g, p in zip(self.names, self.global_params, self._local, strict=True)}

    @torch.no_grad()
    def step(self, average: Mapping[str, torch.Tensor]) -> None:
        """One outer step with the averaged pseudo-gradient, then local = global."""
        for n, g in zip(self.names, self.global_params, strict=True):
            g.grad = average[n].to(torch.float32).clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.copy_to_local()

    @torch.no_grad()
    def copy_to_local(self) -> None:
        for g, p in zip(self.global_params, self._local, strict=True):
            p.copy_(g.to(p.device, p.dtype))

    def global_state(self) -> dict[str, torch.Tensor]:
        return {n: g.detach() for n, g in zip(self.names, self.global_params, strict=True)}

    def momentum_state(self) -> dict[str, torch.Tensor]:
        """The outer optimizer's momentum buffers (none before the first outer step)."""
        out = {}
        for n, g in zip(self.names, self.global_params, strict=True):
            buf = self.optimizer.state.get(g, {}).get("momentum_buffer")
            if buf is not None:
                out[n] = buf.detach()
        return out

    @torch.no_grad()
    def load(self, params: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor]) -> None:
        """Restore the global parameters and momentum (a checkpoint); local = global."""
        for n, g in zip(self.names, self.global_params, strict=True):
            g.copy_(params[n])
            if n in momentum:
                self.optimizer.state[g]["momentum_buffer"] = momentum[n].clone()
        self.copy_to_local()

    def params_sha256(self) -> str:
        return tensors_sha256(self.global_state())


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of named tensors (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode_payload(tensors: Mapping[str, torch.Tensor], dtype: str, workers: int) -> bytes:
    """A node's pseudo-gradient as safetensors bytes in ``dtype``."""
    target = DTYPES[dtype]
    cast = {n: t.detach().to("cpu", target).contiguous() for n, t in tensors.items()}
    return save_safetensors(cast, metadata={"format": PAYLOAD_FORMAT, "dtype": dtype,
                                            "workers": str(workers)})


def decode_payload(sender: str, data: bytes, expected: Mapping[str, torch.Size],
                   dtype: str, max_workers: int = 1_000_000) -> Contribution:
    """Parse and check a payload (safetensors: no code runs while parsing). Raises
    :class:`PayloadError` when it is not a pseudo-gradient of this model."""
    try:
        tensors = load_safetensors(data)
        metadata = _metadata(data)
    except Exception as exc:  # noqa: BLE001 - any parser failure means "not a payload"
        raise PayloadError(f"payload of {sender[:16]}... is not safetensors: {exc}") from exc
    if metadata.get("format") != PAYLOAD_FORMAT or metadata.get("dtype") != dtype:
        raise PayloadError(f"payload of {sender[:16]}... has format {metadata.get('format')!r} "
                           f"dtype {metadata.get('dtype')!r}, expected {PAYLOAD_FORMAT!r} {dtype!r}")
    try:
        workers = int(metadata.get("workers", ""))
    except ValueError:
        workers = 0
    if not 1 <= workers <= max_workers:
        raise PayloadError(f"payload of {sender[:16]}... claims {metadata.get('workers')!r} workers")
    if set(tensors) != set(expected):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise PayloadError(f"payload of {sender[:16]}... has other parameters than this model "
                           f"(unexpected {extra[:3]}, missing {missing[:3]})")
    for name, shape in expected.items():
        t = tensors[name]
        if t.shape != shape or t.dtype != DTYPES[dtype]:
            raise PayloadError(f"payload of {sender[:16]}...: {name} is {t.dtype} "
                               f"{tuple(t.shape)}, expected {dtype} {tuple(shape)}")
        if not torch.isfinite(t).all():
            raise PayloadError(f"payload of {sender[:16]}...: {name} has non-finite values")
    return Contribution(sender=sender, workers=workers, tensors=tensors)


def _metadata(data: bytes) -> dict[str, str]:
    import json
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def average(contributions: list[Contribution]) -> dict[str, torch.Tensor]:
    """The worker-weighted mean, summed in sorted sender order in fp32 (the same bits on
    every node that averages the same contributions)."""
    if not contributions:
        raise ValueError("nothing to average")
    ordered = sorted(contributions, key=lambda c: c.sender)
    total = sum(c.workers for c in ordered)
    names = list(ordered[0].tensors)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        acc = torch.zeros_like(ordered[0].tensors[name], dtype=torch.float32)
        for c in ordered:
            acc.add_(c.tensors[name].to(torch.float32), alpha=float(c.workers))
        out[name] = acc.div_(float(total))
    return out
