"""What a run measures: its task names resolved to leaf tasks and groups, its tenant's custom
task folders, and where each leaf's docs live in PostgreSQL.

Names resolve in the run's custom task folders first, then the project's ``datasets/``,
then lm-eval's built-in tasks (:class:`~cluster.tasks.lmeval.TaskCatalog`); groups and tags
become their leaf tasks (:func:`~cluster.tasks.lmeval.plan_tasks`). A leaf's docs are loaded
into PostgreSQL on first use (idempotent by content hash): a task of the project's
``datasets/`` under its name (as the loop keeps it), any other under
``<task>@<hash of its data source>`` (a tenant's own task: of its folder's content), so
that two tasks of one name with other data never share a table.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cluster.core.evaluations import EvaluationSpec
from cluster.core.settings import Settings
from cluster.tasks.datasets import DatasetRegistry, LoadResult, load_lmeval_data, load_task_datasets
from cluster.tasks.lmeval import LeafTask, TaskCatalog, TaskPlan, plan_tasks
from cluster.tasks.lmeval.custom import (
    CustomTaskError,
    check_task_folder,
    decode_files,
    materialize,
    volume_folder,
)
from cluster.tasks.lmeval.sources import SPLIT_KEYS

log = logging.getLogger(__name__)

# what decides the docs stored (process_docs is applied to them later, by the adapter)
_DATA_KEYS = frozenset({"dataset_path", "dataset_name", "dataset_kwargs", *SPLIT_KEYS})


@dataclass(frozen=True)
class CustomFolder:
    path: Path
    digest: str


@dataclass(frozen=True)
class RunTasks:
    catalog: TaskCatalog
    plan: TaskPlan
    custom: tuple[CustomFolder, ...]

    def dataset_key(self, leaf: LeafTask) -> str:
        """The PostgreSQL dataset of ``leaf``: its name, suffixed where its data are a
        tenant's own or a group changed them."""
        folder = self._custom_folder(leaf)
        if folder is not None:
            return f"{leaf.name}@{folder.digest[:12]}"
        changed = {k: v for k, v in leaf.extra_overrides.items() if k in _DATA_KEYS}
        if not changed and leaf.inline is None and self._shipped(leaf.name):
            return leaf.name
        config = self.catalog.config(leaf.name, leaf.extra_overrides or None, leaf.inline,
                                     leaf.base_dir)
        source = json.dumps({k: config.get(k) for k in sorted(_DATA_KEYS)}, sort_keys=True,
                            default=str)
        return f"{leaf.name}@{hashlib.sha256(source.encode()).hexdigest()[:12]}"

    def _shipped(self, name: str) -> bool:
        """A task whose YAML lies in the project's ``datasets/`` (the loop's own)."""
        entry = self.catalog.entry(name)
        return (entry is not None and entry.yaml_path is not None
                and Path(entry.yaml_path).resolve().is_relative_to(self.catalog.datasets_dir))

    def _custom_folder(self, leaf: LeafTask) -> CustomFolder | None:
        if not self.custom:
            return None
        if leaf.inline is not None:
            where = leaf.base_dir
        else:
            entry = self.catalog.entry(leaf.name)
            where = Path(entry.yaml_path) if entry is not None and entry.yaml_path else None
        for folder in self.custom:
            if where is not None and Path(where).resolve().is_relative_to(folder.path):
                return folder
        return None


def _volume_digest(folder: Path) -> str:
    digest = hashlib.sha256(str(folder).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"\0{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def custom_folders(spec: EvaluationSpec, settings: Settings) -> list[CustomFolder]:
    """The run's custom task folders, written and checked (:mod:`cluster.tasks.lmeval.custom`).
    Raises :class:`CustomTaskError` naming the offending upload, file and field."""
    budget = settings.evaluations.max_custom_task_bytes
    out: list[CustomFolder] = []
    for i, source in enumerate(spec.custom_tasks):
        param = f"custom_tasks.{i}"
        if source.volume_path is not None:
            if source.files:
                raise CustomTaskError("give files or volume_path, not both", param)
            path = volume_folder(settings.tasks_sources, source.volume_path, param)
            folder = CustomFolder(path, _volume_digest(path))
        else:
            files = decode_files(source.files, budget, param)
            budget -= sum(len(b) for b in files.values())
            try:
                path = materialize(files, settings.cache_dir)
            except OSError as exc:
                raise CustomTaskError(f"cannot write the uploaded files under cache_dir "
                                      f"{settings.cache_dir}: {exc}", param, 500) from exc
            folder = CustomFolder(path, path.name)
        check_task_folder(folder.path, settings.tasks_sources, param)
        out.append(folder)
    return out


def resolve_run_tasks(spec: EvaluationSpec, settings: Settings) -> RunTasks:
    """The run's catalog and plan (raises ``TaskError``/``DatasetError`` for unknown names
    and :class:`CustomTaskError` for refused custom tasks)."""
    folders = custom_folders(spec, settings)
    catalog = TaskCatalog.of(settings.datasets_dir, settings.tasks_sources,
                             [f.path for f in folders])
    return RunTasks(catalog, plan_tasks(spec.tasks, catalog), tuple(folders))


async def load_leaf_data(store: DatasetRegistry, tasks: RunTasks, leaf: LeafTask) -> LoadResult:
    """The leaf's docs in PostgreSQL (a no-op when the same data are loaded)."""
    key = tasks.dataset_key(leaf)
    shipped = tasks.catalog.datasets_dir / leaf.name
    if key == leaf.name and shipped.is_dir() and tasks.catalog.kind(leaf.name) == "task" and (
            tasks.catalog.yaml_path(leaf.name).parent == shipped.resolve()):
        (result,) = await load_task_datasets(store, tasks.catalog.datasets_dir, [leaf.name])
        return result
    return await load_lmeval_data(store, tasks.catalog, leaf, key)
