"""Load lm-eval tasks from the project's ``datasets/`` YAMLs with lm-eval's own TaskManager.

The YAMLs read local files (``dataset_path: json``) with ``dataset_kwargs.data_files``
relative to the YAML's folder. The Hugging Face ``json`` loader would resolve them against
the current directory, so :func:`task_config` returns the task's full config with those
paths made absolute; it is what both testbench and a plain lm-eval run
(``simple_evaluate(tasks=[task_config(...)])``) load, so both see the same task.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.core.errors import TaskError
from cluster.tasks.lmeval import _compat as lmeval_compat

if TYPE_CHECKING:
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

_lock = threading.Lock()
_managers: dict[Path, TaskManager] = {}
_tasks: dict[tuple[Path, str], ConfigurableTask] = {}


def task_manager(datasets_dir: Path) -> TaskManager:
    """lm-eval's TaskManager over ``datasets_dir`` only (no built-in tasks), cached."""
    from lm_eval.tasks import TaskManager

    root = Path(datasets_dir).resolve()
    with _lock:
        manager = _managers.get(root)
        if manager is None:
            if not root.is_dir():
                raise TaskError(f"datasets directory {root} does not exist")
            manager = TaskManager(include_path=str(root), include_defaults=False)
            _managers[root] = manager
        return manager


def task_yaml_path(name: str, datasets_dir: Path) -> Path:
    manager = task_manager(datasets_dir)
    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        known = ", ".join(manager.all_subtasks) or "none"
        raise TaskError(f"unknown task {name!r} in {Path(datasets_dir).resolve()} (known: {known})")
    return Path(entry.yaml_path)


def _absolute_data_files(data_files: Any, base: Path) -> Any:
    def resolve(value: Any) -> Any:
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            return str((base / value).resolve())
        return value

    if isinstance(data_files, dict):
        return {
            split: [resolve(v) for v in files] if isinstance(files, list) else resolve(files)
            for split, files in data_files.items()
        }
    if isinstance(data_files, list):
        return [resolve(v) for v in data_files]
    return resolve(data_files)


def task_config(name: str, datasets_dir: Path) -> dict[str, Any]:
    """The task's full lm-eval config (``include``s merged, ``!function``s resolved) with
    local ``data_files`` made absolute. Pass it to ``TaskManager.load`` or ``simple_evaluate``."""
    path = task_yaml_path(name, datasets_dir)
    cfg = copy.deepcopy(lmeval_compat.load_task_yaml(path))
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        kwargs["data_files"] = _absolute_data_files(kwargs["data_files"], path.parent)
    for key in ("data_dir",):
        if isinstance(kwargs, dict) and isinstance(kwargs.get(key), str):
            kwargs[key] = str((path.parent / kwargs[key]).resolve())
    cfg.setdefault("metadata", {})
    if isinstance(cfg["metadata"], dict):
        cfg["metadata"]["config_path"] = str(path)
    return cfg


def load_lmeval_task(name: str, datasets_dir: Path) -> ConfigurableTask:
    """Build (once per process) lm-eval's Task object for ``name``, dataset loaded."""
    from lm_eval.api.task import ConfigurableTask

    lmeval_compat.compile_templates_once()
    root = Path(datasets_dir).resolve()
    key = (root, name)
    with _lock:
        task = _tasks.get(key)
    if task is not None:
        return task
    cfg = task_config(name, root)
    manager = task_manager(root)
    try:
        loaded = manager.load([cfg])
    except Exception as exc:  # lm-eval raises plain exceptions for bad configs / data
        raise TaskError(f"lm-eval could not load task {name!r} from {root}: {exc!r}") from exc
    task = loaded["tasks"].get(name)
    if not isinstance(task, ConfigurableTask):
        raise TaskError(f"{name!r} is not a single lm-eval task (groups and tags are not supported)")
    with _lock:
        task = _tasks.setdefault(key, task)
    log.info("lmeval_task_loaded task=%s output_type=%s", name, task.OUTPUT_TYPE)
    return task
