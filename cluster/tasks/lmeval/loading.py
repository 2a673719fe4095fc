"""Find and load lm-eval tasks with lm-eval's own TaskManager: the project's ``datasets/``
YAMLs first, then lm-eval's built-in task registry.

A :class:`TaskCatalog` is where names resolve: ``datasets_dir`` and any extra folders (a
tenant's uploaded tasks) through a TaskManager without lm-eval's defaults (fast: a few
YAMLs), and only for a name not found there, a TaskManager over lm-eval's built-in tasks
(``include_defaults=True``, the same folders on top so they still win; indexing its ~13k
YAMLs takes seconds, once per process).

:meth:`TaskCatalog.config` returns a task's full config as lm-eval would load it
(``include``s merged, ``!function``s resolved), with local ``data_files`` made absolute
(the Hugging Face ``json`` loader resolves relative paths against the current directory)
and its data source settled by :func:`cluster.tasks.lmeval.sources.with_data_source`
(the offline data directory, or the hub where allowed). It is what both testbench and a
plain lm-eval run (``simple_evaluate(tasks=[config])``) load, so both see the same task.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cluster.core.errors import TaskError
from cluster.core.settings import TaskSourceSettings
from cluster.tasks.lmeval import _compat as lmeval_compat
from cluster.tasks.lmeval.sources import with_data_source

if TYPE_CHECKING:
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

TaskKind = Literal["task", "group", "tag"]

_lock = threading.Lock()
_managers: dict[tuple[tuple[Path, ...], bool], TaskManager] = {}
_tasks: dict[tuple[Any, ...], ConfigurableTask] = {}


@dataclass(frozen=True)
class TaskCatalog:
    """Where task names resolve and where their data may come from (hashable: a cache key)."""

    datasets_dir: Path
    sources: TaskSourceSettings = field(default_factory=TaskSourceSettings)
    include_dirs: tuple[Path, ...] = ()

    @classmethod
    def of(cls, datasets_dir: Path | str, sources: TaskSourceSettings | None = None,
           include_dirs: Sequence[Path] = ()) -> TaskCatalog:
        return cls(Path(datasets_dir).resolve(), sources or TaskSourceSettings(),
                   tuple(Path(p).resolve() for p in include_dirs))

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.datasets_dir, *self.include_dirs)

    def local_manager(self) -> TaskManager:
        """TaskManager over ``datasets_dir`` and the extra folders only (no built-ins)."""
        return _manager(self.paths, builtin=False)

    def builtin_manager(self) -> TaskManager:
        """TaskManager over lm-eval's built-in tasks with this catalog's folders on top."""
        return _manager(self.paths, builtin=True)

    def entry(self, name: str) -> Any:
        """lm-eval's index entry of ``name`` (project folders first), or None."""
        found = self.local_manager().task_index.get(name)
        if found is None:
            found = self.builtin_manager().task_index.get(name)
        return found

    def kind(self, name: str) -> TaskKind | None:
        entry = self.entry(name)
        if entry is None:
            return None
        kind = entry.kind.name
        if kind in ("TASK", "PY_TASK"):
            return "task"
        return "group" if kind == "GROUP" else "tag" if kind == "TAG" else None

    def local_names(self) -> list[str]:
        """Tasks and groups of the project's folders (what a deployment ships)."""
        manager = self.local_manager()
        return sorted({*manager.all_subtasks, *manager.all_groups})

    def unknown(self, name: str) -> TaskError:
        shipped = ", ".join(self.local_names()) or "none"
        return TaskError(
            f"unknown task {name!r}: not in {', '.join(str(p) for p in self.paths)} (which ship "
            f"{shipped}) nor among lm-eval's built-in tasks, groups and tags")

    def yaml_path(self, name: str) -> Path:
        entry = self.entry(name)
        if entry is None:
            raise self.unknown(name)
        if entry.kind.name == "PY_TASK":
            raise TaskError(f"task {name!r} is a Python class task ({entry.yaml_path}); only "
                            "YAML tasks are supported")
        if entry.kind.name != "TASK" or entry.yaml_path is None:
            raise TaskError(f"{name!r} is an lm-eval {entry.kind.name.lower()}, not a task")
        return Path(entry.yaml_path)

    def config(self, name: str, overrides: Mapping[str, Any] | None = None,
               inline: Mapping[str, Any] | None = None, base_dir: Path | None = None
               ) -> dict[str, Any]:
        """The task's full lm-eval config (see module): registered ``name`` with ``overrides``
        (a group's per-member settings), or an ``inline`` config defined in a group YAML
        (relative files against ``base_dir``)."""
        if inline is not None:
            cfg = copy.deepcopy(dict(inline))
            folder = base_dir or self.datasets_dir
            config_path: Path | None = None
        else:
            config_path = self.yaml_path(name)
            cfg = copy.deepcopy(lmeval_compat.load_task_yaml(config_path))
            folder = config_path.parent
            if overrides:
                cfg = {**cfg, **copy.deepcopy(dict(overrides))}
        cfg["task"] = name
        kwargs = cfg.get("dataset_kwargs")
        if isinstance(kwargs, dict) and "data_files" in kwargs:
            kwargs["data_files"] = _absolute_data_files(kwargs["data_files"], folder)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("data_dir"), str) and (
                cfg.get("dataset_path") in ("json", "csv", "parquet", "text", "arrow")):
            kwargs["data_dir"] = str((folder / kwargs["data_dir"]).resolve())
        cfg = with_data_source(name, cfg, self.sources)
        if config_path is not None:
            metadata = cfg.setdefault("metadata", {})
            if isinstance(metadata, dict):
                metadata["config_path"] = str(config_path)
        return cfg


def as_catalog(where: TaskCatalog | Path | str) -> TaskCatalog:
    return where if isinstance(where, TaskCatalog) else TaskCatalog.of(where)


def _manager(paths: tuple[Path, ...], builtin: bool) -> TaskManager:
    from lm_eval.tasks import TaskManager

    key = (paths, builtin)
    with _lock:
        manager = _managers.get(key)
    if manager is not None:
        return manager
    for path in paths:
        if not path.is_dir():
            raise TaskError(f"task folder {path} does not exist")
    if builtin:
        manager = lmeval_compat.builtin_task_manager([str(p) for p in paths])
    else:
        manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if builtin:
        log.info("lmeval_builtin_index tasks=%d groups=%d", len(manager.all_subtasks),
                 len(manager.all_groups))
    with _lock:
        return _managers.setdefault(key, manager)


def task_manager(where: TaskCatalog | Path | str) -> TaskManager:
    """lm-eval's TaskManager over the catalog's own folders (no built-in tasks), cached."""
    return as_catalog(where).local_manager()


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


def task_config(name: str, where: TaskCatalog | Path | str,
                overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The task's full lm-eval config (:meth:`TaskCatalog.config`). Pass it to
    ``TaskManager.load`` or ``simple_evaluate``."""
    return as_catalog(where).config(name, overrides)


def config_digest(value: Mapping[str, Any] | None) -> str:
    """A stable key for a task's overrides or inline config (None: none)."""
    if not value:
        return ""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_lmeval_task(
    name: str,
    where: TaskCatalog | Path | str,
    overrides: Mapping[str, Any] | None = None,
    inline: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
) -> ConfigurableTask:
    """Build (once per process) lm-eval's Task object for ``name``, dataset loaded."""
    from lm_eval.api.task import ConfigurableTask

    lmeval_compat.compile_templates_once()
    catalog = as_catalog(where)
    key = (catalog, name, config_digest(overrides), config_digest(inline))
    with _lock:
        task = _tasks.get(key)
    if task is not None:
        return task
    cfg = catalog.config(name, overrides, inline, base_dir)
    try:
        loaded = catalog.local_manager().load([cfg])
    except Exception as exc:  # lm-eval raises plain exceptions for bad configs / data
        raise TaskError(
            f"lm-eval could not load task {name!r} (dataset {cfg.get('dataset_path')!r}): "
            f"{exc!r}") from exc
    task = loaded["tasks"].get(name)
    if not isinstance(task, ConfigurableTask):
        raise TaskError(f"{name!r} is not a single lm-eval YAML task")
    with _lock:
        task = _tasks.setdefault(key, task)
    log.info("lmeval_task_loaded task=%s output_type=%s", name, task.OUTPUT_TYPE)
    return task
