"""Where an lm-eval task's data come from: local files, the offline data directory, the hub.

A task YAML names its data as lm-eval hands them to ``datasets.load_dataset``:
``dataset_path`` is either a local builder (``json``, ``csv``, ``parquet``, ...) reading
``dataset_kwargs.data_files``, which :mod:`cluster.tasks.lmeval.loading` makes absolute,
or a Hugging Face hub id (``allenai/openbookqa``) with a config name (``dataset_name``,
``main``). A hub id is looked up in the offline data directory
(``tasks_sources.offline_data_dir``, a mounted volume) under ``<dataset_path>/``, in the
first of these folders that holds data files:

- ``<dataset_name>/`` (the hub's own layout: ``main/test-00000-of-00001.parquet``), then the
  ``data_dir`` of ``dataset_kwargs`` if any, then ``default/``, ``data/`` and the folder itself;
- in it, per split, ``<split>.<ext>``, ``<split>-00000-of-00001.<ext>`` shards, or
  ``<split>/*.<ext>`` (the hub's parquet conversion), ``<ext>`` one of parquet, jsonl,
  json, csv.

Found, the task's config is rewritten to read those files with the matching local builder
(what lm-eval and the PostgreSQL loader then both read); a split the task names but the
folder lacks is dropped (an error for the eval split). Not found, the hub is used only where
``tasks_sources.allow_online`` is on; otherwise a :class:`~cluster.core.errors.DatasetError`
names the task, the dataset and every folder looked in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.core.errors import DatasetError, TaskError
from cluster.core.settings import TaskSourceSettings

log = logging.getLogger(__name__)

LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
BUILDER_OF_EXTENSION = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)?$")


@dataclass(frozen=True)
class OfflineData:
    """A dataset found in the offline data directory: one builder, files per split."""

    folder: Path
    builder: str
    splits: dict[str, tuple[Path, ...]]


def eval_split(config: Mapping[str, Any]) -> str | None:
    """The split lm-eval evaluates: ``test_split``, else ``validation_split``."""
    split = config.get("test_split") or config.get("validation_split")
    return str(split) if split else None


def is_local_builder(config: Mapping[str, Any]) -> bool:
    path = config.get("dataset_path")
    return isinstance(path, str) and path in LOCAL_BUILDERS


def split_files_of(folder: Path) -> dict[str, list[Path]]:
    """split → data files of one folder (``<split>.<ext>``, shards, ``<split>/*.<ext>``)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in BUILDER_OF_EXTENSION:
            match = _SHARD.match(path.stem)
            found.setdefault(match.group("split") if match else path.stem, []).append(path)
        elif path.is_dir() and not path.name.startswith("."):
            inner = [p for p in sorted(path.iterdir())
                     if p.is_file() and p.suffix.lower() in BUILDER_OF_EXTENSION]
            if inner:
                found.setdefault(path.name, []).extend(inner)
    return found


def candidate_folders(
    root: Path, dataset_path: str, dataset_name: str | None, data_dir: str | None
) -> list[Path]:
    """Where ``dataset_path``/``dataset_name`` may lie under ``root``, in lookup order."""
    if not _HUB_ID.match(dataset_path) or ".." in dataset_path.split("/"):
        raise DatasetError(f"dataset_path {dataset_path!r} is not a hub id (owner/name)")
    base = root / dataset_path
    names = [n for n in (dataset_name, data_dir, "default", "data") if n]
    folders = [base / n for n in names if ".." not in Path(n).parts and not Path(n).is_absolute()]
    folders.append(base)
    return list(dict.fromkeys(folders))


def find_offline(
    root: Path, dataset_path: str, dataset_name: str | None, data_dir: str | None = None
) -> tuple[OfflineData | None, list[Path]]:
    """The dataset's files under ``root`` (None if absent), and the folders looked in."""
    looked = candidate_folders(root, dataset_path, dataset_name, data_dir)
    for folder in looked:
        if not folder.is_dir():
            continue
        splits = split_files_of(folder)
        if not splits:
            continue
        extensions = {p.suffix.lower() for files in splits.values() for p in files}
        builders = {BUILDER_OF_EXTENSION[e] for e in extensions}
        if len(builders) > 1:
            raise DatasetError(
                f"{folder}: data files of several formats ({', '.join(sorted(extensions))}); "
                "keep one format per dataset folder")
        return OfflineData(folder, builders.pop(),
                           {s: tuple(files) for s, files in splits.items()}), looked
    return None, looked


def _describe(config: Mapping[str, Any]) -> str:
    name = config.get("dataset_name")
    return f"{config.get('dataset_path')!r}" + (f" (config {name!r})" if name else "")


def check_code_execution(task: str, config: Mapping[str, Any], sources: TaskSourceSettings
                         ) -> None:
    """A :class:`TaskError` for a task that would run code the deployment does not allow."""
    if sources.allow_code_execution:
        return
    if config.get("unsafe_code"):
        raise TaskError(
            f"task {task!r} is marked unsafe_code (it executes model output); this deployment "
            "does not allow code execution (tasks_sources.allow_code_execution: false)")
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, Mapping) and kwargs.get("trust_remote_code"):
        raise TaskError(
            f"task {task!r}: dataset {_describe(config)} needs trust_remote_code (a loading "
            "script); this deployment does not allow code execution "
            "(tasks_sources.allow_code_execution: false)")


def with_data_source(task: str, config: dict[str, Any], sources: TaskSourceSettings
                     ) -> dict[str, Any]:
    """``config`` reading its data from where this deployment may read them (see module)."""
    check_code_execution(task, config, sources)
    path = config.get("dataset_path")
    if is_local_builder(config):
        remote = [str(f) for files in (data_files(config) or {}).values() for f in files
                  if "://" in str(f)]
        if remote and not sources.allow_online:
            raise DatasetError(
                f"task {task!r} reads {remote[0]} over the network; this deployment does not "
                "(tasks_sources.allow_online: false)")
        return config
    if not isinstance(path, str) or Path(path).is_absolute():
        return config  # a local folder, or a Python task's own loading
    kwargs = config.get("dataset_kwargs") if isinstance(config.get("dataset_kwargs"), dict) else {}
    name = config.get("dataset_name")
    looked: list[Path] = []
    if sources.offline_data_dir is not None:
        found, looked = find_offline(Path(sources.offline_data_dir), path,
                                     str(name) if name else None, kwargs.get("data_dir"))
        if found is not None:
            return _rewritten(task, config, found)
    if sources.allow_online:
        return config
    where = (", ".join(str(p) for p in looked) if looked
             else "nowhere: no offline data directory is configured "
                  "(tasks_sources.offline_data_dir)")
    raise DatasetError(
        f"task {task!r}: dataset {_describe(config)} was not found offline (looked in {where}) "
        "and this deployment does not read the Hugging Face hub "
        "(tasks_sources.allow_online: false)")


def _rewritten(task: str, config: dict[str, Any], found: OfflineData) -> dict[str, Any]:
    out = dict(config)
    out["dataset_path"] = found.builder
    out["dataset_name"] = None
    out["dataset_kwargs"] = {"data_files": {s: [str(p) for p in files]
                                            for s, files in sorted(found.splits.items())}}
    evaluated = eval_split(config)
    if evaluated is not None and evaluated not in found.splits:
        raise DatasetError(
            f"task {task!r}: {found.folder} holds splits {sorted(found.splits)}, not the eval "
            f"split {evaluated!r} of dataset {_describe(config)}")
    for key in SPLIT_KEYS:
        split = config.get(key)
        if split and split not in found.splits:
            log.info("tasks.offline_split_missing task=%s %s=%s folder=%s", task, key, split,
                        found.folder)
            out[key] = None
    log.info("tasks.offline_data task=%s dataset=%s folder=%s splits=%s", task,
             config.get("dataset_path"), found.folder, ",".join(sorted(found.splits)))
    return out


def _file(value: Any) -> Any:
    """A local data file as a Path; a URL stays a string (``Path`` would mangle ``//``)."""
    return str(value) if "://" in str(value) else Path(value)


def data_files(config: Mapping[str, Any]) -> dict[str, list[Any]] | None:
    """split → local files of a config that reads local files (None: hub or Python)."""
    if not is_local_builder(config):
        return None
    kwargs = config.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, Mapping) else None
    if isinstance(files, Mapping):
        return {str(split): [_file(f) for f in (v if isinstance(v, list | tuple) else [v])]
                for split, v in files.items()}
    if isinstance(files, str | Sequence) and files:
        listed = [files] if isinstance(files, str) else list(files)
        return {"train": [_file(f) for f in listed]}  # the datasets library's default split
    return None
