"""The checkpoint of a training run at an outer-step boundary: safetensors and JSON only.

At the end of an outer step every worker's local parameters equal the global ones, so one
checkpoint directory holds (Ray Train merges the workers' files into it):

    checkpoint.json                   run id, outer step, workers, sha256 of the parameters
    model.safetensors                 the global parameters (fp32)            rank 0
    outer_optimizer.safetensors       Nesterov momentum buffers               rank 0
    inner_optimizer.rank{r}.safetensors  AdamW moments and step, by name      every rank
    state.rank{r}.json                steps, data cursor, losses              every rank

Nothing is pickled, so a checkpoint from elsewhere cannot run code when it is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from cluster.core.errors import TestbenchError
from cluster.train.data import DataCursor
from cluster.train.diloco import DilocoOuter
from cluster.train.progress import EvalPoint

CHECKPOINT_FORMAT = "testbench-diloco-checkpoint-v1"
SEP = "::"


class CheckpointError(TestbenchError):
    """A checkpoint is missing files or belongs to another run or worker layout."""


class WorkerState(BaseModel):
    """Where one worker is: what a resumed worker needs besides tensors."""

    model_config = ConfigDict(extra="forbid")

    outer_step: int = Field(default=0, description="outer steps completed")
    inner_steps: int = Field(default=0, description="inner steps completed over the run")
    cursor: DataCursor = Field(default_factory=DataCursor)
    tokens: int = Field(default=0, description="tokens this worker trained on")
    last_loss: float | None = None
    eval_losses: list[EvalPoint] = Field(default_factory=list, description="rank 0 only")


class CheckpointInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = CHECKPOINT_FORMAT
    run_id: str
    outer_step: int
    workers: int
    params_sha256: str


def inner_state_tensors(optimizer: torch.optim.Optimizer, names: list[str],
                        params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, p in zip(names, params, strict=True):
        for key, value in optimizer.state.get(p, {}).items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{name}{SEP}{key}"] = t.detach().cpu().contiguous()
    return out


def load_inner_state(optimizer: torch.optim.Optimizer, names: list[str],
                     tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore AdamW state saved by :func:`inner_state_tensors`; ``optimizer`` must have been
    built over the parameters in ``names`` order (one group)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    index = {n: i for i, n in enumerate(names)}
    for key, value in tensors.items():
        name, _, field = key.rpartition(SEP)
        if name not in index:
            raise CheckpointError(f"inner optimizer state for unknown parameter {name!r}")
        state.setdefault(index[name], {})[field] = value
    optimizer.load_state_dict({"state": state,
                               "param_groups": optimizer.state_dict()["param_groups"]})


def save_checkpoint(directory: Path, *, run_id: str, rank: int, world_size: int,
                    outer: DilocoOuter, inner: torch.optim.Optimizer,
                    inner_params: list[torch.nn.Parameter], state: WorkerState) -> None:
    """Write this worker's part of the checkpoint into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(inner_state_tensors(inner, outer.names, inner_params),
              str(directory / f"inner_optimizer.rank{rank}.safetensors"))
    (directory / f"state.rank{rank}.json").write_text(state.model_dump_json())
    if rank == 0:
        save_file({n: t.contiguous() for n, t in outer.global_state().items()},
                  str(directory / "model.safetensors"))
        save_file({n: t.contiguous() for n, t in outer.momentum_state().items()},
                  str(directory / "outer_optimizer.safetensors"))
        info = CheckpointInfo(run_id=run_id, outer_step=state.outer_step, workers=world_size,
                              params_sha256=outer.params_sha256())
        (directory / "checkpoint.json").write_text(info.model_dump_json())


def load_checkpoint(directory: Path, *, run_id: str, rank: int, world_size: int,
                    outer: DilocoOuter, inner: torch.optim.Optimizer) -> WorkerState:
    """Restore this worker from ``directory``: global and local parameters, both optimizers,
    and its state (data cursor, steps)."""
    info_path = directory / "checkpoint.json"
    if not info_path.is_file():
        raise CheckpointError(f"{directory} has no checkpoint.json")
    info = CheckpointInfo.model_validate_json(info_path.read_text())
    if info.format != CHECKPOINT_FORMAT or info.run_id != run_id:
        raise CheckpointError(f"{directory} is a checkpoint of run {info.run_id!r} "
                              f"({info.format}), not of {run_id!r}")
    if info.workers != world_size:
        raise CheckpointError(f"{directory} was written by {info.workers} workers; this node "
                              f"now runs {world_size}: restart with the same scaling.workers")
    outer.load(load_file(str(directory / "model.safetensors")),
               load_file(str(directory / "outer_optimizer.safetensors")))
    if outer.params_sha256() != info.params_sha256:
        raise CheckpointError(f"{directory}: parameters do not match their recorded sha256")
    load_inner_state(inner, outer.names,
                     load_file(str(directory / f"inner_optimizer.rank{rank}.safetensors")))
    return WorkerState.model_validate_json(
        (directory / f"state.rank{rank}.json").read_text())


def read_info(directory: Path) -> CheckpointInfo | None:
    path = directory / "checkpoint.json"
    if not path.is_file():
        return None
    return CheckpointInfo.model_validate(json.loads(path.read_text()))
