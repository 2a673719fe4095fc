"""What testbench's own task kinds share (``kind: diffusion``, ``kind: signature``): reading
``datasets/<task>/<task>.yaml`` and aggregating per-doc values.

lm-eval tasks have their own machinery (:mod:`cluster.tasks.lmeval`); a native task is a
YAML with ``testbench_task`` and ``kind`` instead of lm-eval's ``task:``, which lm-eval's
TaskManager skips.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from cluster.core.errors import TaskError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def native_task_config(name: str, datasets_dir: Path, kind: str, model: type[ConfigT]
                       ) -> ConfigT | None:
    """Task ``name``'s config when its YAML is a native task of ``kind``, else None.

    Raises :class:`TaskError` for YAML that does not parse, a config of the kind that does
    not validate, or a ``testbench_task`` that is not the folder's name."""
    path = Path(datasets_dir) / name / f"{name}.yaml"
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("kind") != kind:
        return None
    try:
        config = model.model_validate(raw)
    except ValidationError as exc:
        raise TaskError(f"{path}: bad {kind} task: {exc}") from exc
    declared = getattr(config, "testbench_task", None)
    if declared != name:
        raise TaskError(f"{path}: testbench_task is {declared!r}, expected {name!r}")
    return config


def mean_stderr(metric: str, values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for a single value)."""
    if not values:
        raise ValueError(f"no values to aggregate for {metric}")
    mean = float(statistics.fmean(values))
    if len(values) <= 1:
        return mean, None
    return mean, float(statistics.stdev(values) / math.sqrt(len(values)))
