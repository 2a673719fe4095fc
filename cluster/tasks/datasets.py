"""Load task datasets into PostgreSQL: the project's ``datasets/`` dirs, a user's files, an
lm-eval task's own data (local files, the offline data directory, or the hub where
allowed: :func:`load_lmeval_data`), or the Hugging Face hub.

A task dir holds its splits as files named ``<split>.<ext>`` (``train.jsonl``,
``test.jsonl``...) beside files that are not data (YAMLs, LICENSE, README). A doc's id is
its 0-based row index in its split. Loading is idempotent: the sha256 over the split
files' bytes decides whether anything changes (see ``dataset_sha256``).

Parsing errors are ``DatasetError``s naming the file (and line, where there is one).
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import decimal
import hashlib
import importlib
import io
import json
import logging
import math
import os
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from cluster.core.errors import DatasetError, TaskError
from cluster.storage.connections import open_datasets
from cluster.tasks.lmeval.groups import LeafTask, plan_tasks
from cluster.tasks.lmeval.loading import TaskCatalog

log = logging.getLogger(__name__)

Row = dict[str, Any]
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class RegisteredDataset(Protocol):
    sha256: str
    splits: dict[str, int]


class DatasetRegistry(Protocol):
    """What loading needs from ``cluster.storage.postgres.DatasetStore``."""

    async def get_registry(self, task_name: str) -> RegisteredDataset | None: ...

    async def register_dataset(
        self, task_name: str, splits: Mapping[str, Sequence[Mapping[str, Any]]], sha256: str
    ) -> bool: ...


class LoadResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    splits: dict[str, int]
    n_docs: int
    sha256: str
    loaded: bool  # False: the same data was already loaded


# -- values -----------------------------------------------------------------------------
def json_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON (for JSONB): NaN/inf → None, dates → ISO strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return json_value(float(value), where)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise DatasetError(f"{where}: object key {key!r} is not a string")
            out[key] = json_value(item, where)
        return out
    if isinstance(value, (list, tuple)):
        return [json_value(item, where) for item in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return json_value(value.tolist(), where)
    raise DatasetError(f"{where}: value of type {type(value).__name__} cannot be stored as JSON")


def _row(value: Any, where: str) -> Row:
    if not isinstance(value, Mapping):
        raise DatasetError(f"{where}: expected a JSON object per row, got {type(value).__name__}")
    result = json_value(value, where)
    assert isinstance(result, dict)
    return result


# -- file formats -------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read: {err}") from err


def read_jsonl(path: Path) -> list[Row]:
    rows: list[Row] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{lineno}: malformed JSON line: {err.msg} (column {err.colno})") from None
        rows.append(_row(value, f"{path}:{lineno}"))
    return rows


def read_json(path: Path) -> list[Row]:
    """A JSON array of objects, or an object whose ``data`` (or ``rows``) is such an array."""
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    if isinstance(value, dict):
        inner = next((value[k] for k in ("data", "rows") if isinstance(value.get(k), list)), None)
        if inner is None:
            raise DatasetError(f"{path}: expected a JSON array of objects (or {{\"data\": [...]}}), got an object")
        value = inner
    if not isinstance(value, list):
        raise DatasetError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    return [_row(item, f"{path}: row {i}") for i, item in enumerate(value)]


def read_csv(path: Path) -> list[Row]:
    """A header row, then rows with exactly as many fields; values stay strings."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header: list[str] | None = None
    rows: list[Row] = []
    try:
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                if any(not name for name in header):
                    raise DatasetError(f"{path}:{reader.line_num}: CSV header has an empty column name")
                dupes = sorted({n for n in header if header.count(n) > 1})
                if dupes:
                    raise DatasetError(f"{path}:{reader.line_num}: CSV header repeats columns {dupes}")
                continue
            if len(fields) != len(header):
                raise DatasetError(
                    f"{path}:{reader.line_num}: inconsistent CSV: {len(fields)} fields, "
                    f"the header has {len(header)}"
                )
            rows.append(dict(zip(header, fields, strict=True)))
    except csv.Error as err:
        raise DatasetError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None
    return rows


def read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError...
        raise DatasetError(f"{path}: not a readable parquet file: {err}") from err
    return [_row(r, f"{path}: row {i}") for i, r in enumerate(table.to_pylist())]


_READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def check_data_file(path: Path) -> None:
    """DatasetError unless ``path`` is an existing file with a supported extension."""
    if path.suffix.lower() not in _READERS:
        raise DatasetError(
            f"{path}: unknown dataset file extension {path.suffix or '(none)'!r}; "
            f"supported: {', '.join(DATA_EXTENSIONS)}"
        )
    if not path.is_file():
        raise DatasetError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")


def read_rows(path: Path) -> list[Row]:
    """Rows of a data file, by extension; DatasetError when missing, empty or malformed."""
    path = Path(path)
    check_data_file(path)
    rows = _READERS[path.suffix.lower()](path)
    if not rows:
        raise DatasetError(f"{path}: empty dataset file (no rows)")
    return rows


# -- task dirs ---------------------------------------------------------------------------
def split_files(task_dir: Path) -> dict[str, Path]:
    """split name → data file of a task dir (files ``<split>.<ext>``; others are ignored)."""
    found: dict[str, Path] = {}
    for path in sorted(Path(task_dir).iterdir()):
        if not path.is_file() or path.suffix.lower() not in DATA_EXTENSIONS:
            continue
        split = path.stem
        if split in found:
            raise DatasetError(f"{task_dir}: split {split!r} has two files: {found[split].name} and {path.name}")
        found[split] = path
    return found


SplitFiles = Mapping[str, Path | Sequence[Path]]


def _paths(files: Path | Sequence[Path]) -> list[Path]:
    return [Path(files)] if isinstance(files, str | Path) else [Path(p) for p in files]


def dataset_sha256(files: SplitFiles) -> str:
    """sha256 over (split name, size, bytes) of each split file (or shard, in order), in
    split-name order."""
    digest = hashlib.sha256()
    for split in sorted(files):
        for path in _paths(files[split]):
            try:
                size = path.stat().st_size
                digest.update(f"{split}\0{size}\0".encode())
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
            except FileNotFoundError:
                raise DatasetError(f"{path}: file not found") from None
    return digest.hexdigest()


def _result(task: str, splits: Mapping[str, int], sha256: str, loaded: bool) -> LoadResult:
    return LoadResult(task=task, splits=dict(splits), n_docs=sum(splits.values()), sha256=sha256, loaded=loaded)


async def _load_files(store: DatasetRegistry, task: str, files: SplitFiles) -> LoadResult:
    sha = await asyncio.to_thread(dataset_sha256, files)
    current = await store.get_registry(task)
    if current is not None and current.sha256 == sha:
        log.info("datasets.unchanged task=%s sha256=%s", task, sha[:12])
        return _result(task, current.splits, sha, loaded=False)

    def parse() -> dict[str, list[Row]]:
        return {split: [row for path in _paths(paths) for row in read_rows(path)]
                for split, paths in sorted(files.items())}

    splits = await asyncio.to_thread(parse)
    loaded = await store.register_dataset(task, splits, sha)
    counts = {split: len(rows) for split, rows in splits.items()}
    log.info("datasets.loaded task=%s splits=%s sha256=%s loaded=%s", task, counts, sha[:12], loaded)
    return _result(task, counts, sha, loaded)


async def load_task_datasets(
    store: DatasetRegistry, datasets_dir: Path, tasks: Sequence[str] | None = None
) -> list[LoadResult]:
    """Load every task dir of ``datasets_dir`` (or only ``tasks``) that holds split files."""
    datasets_dir = Path(datasets_dir)
    if not datasets_dir.is_dir():
        raise DatasetError(f"datasets dir {datasets_dir} does not exist")
    if tasks is None:
        task_dirs = [d for d in sorted(datasets_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        required = False
    else:
        task_dirs = [datasets_dir / t for t in tasks]
        required = True
    results: list[LoadResult] = []
    for task_dir in task_dirs:
        if not task_dir.is_dir():
            raise DatasetError(f"task {task_dir.name!r}: no dataset dir {task_dir}")
        files = split_files(task_dir)
        if not files:
            if required:
                raise DatasetError(
                    f"task {task_dir.name!r}: {task_dir} holds no split files "
                    f"(<split>{'|'.join(DATA_EXTENSIONS)})"
                )
            continue
        results.append(await _load_files(store, task_dir.name, files))
    return results


async def load_user_files(store: DatasetRegistry, task_name: str, files: Mapping[str, Path]) -> LoadResult:
    """Load a user's files (split → path) as ``task_name``'s dataset, replacing any other."""
    if not files:
        raise DatasetError(f"task {task_name!r}: no files given")
    paths = {split: Path(p) for split, p in files.items()}
    for path in paths.values():
        check_data_file(path)
    return await _load_files(store, task_name, paths)


async def load_user_file(store: DatasetRegistry, task_name: str, path: Path, split: str = "test") -> LoadResult:
    """Load one jsonl/json/csv/parquet file as the only split of ``task_name``."""
    return await load_user_files(store, task_name, {split: Path(path)})


def hub_offline() -> bool:
    return any(os.environ.get(flag, "").strip().lower() in {"1", "true", "yes", "on"} for flag in _OFFLINE_FLAGS)


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub (``HF_ENDPOINT``) cannot be reached, or None; spares the client's retries."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{host}:{port} is unreachable ({err})"


async def load_hub_dataset(
    store: DatasetRegistry, task_name: str, hub_path: str, name: str | None, split: str
) -> LoadResult:
    """Load one split of a Hugging Face hub dataset (needs the ``datasets`` package and network)."""
    where = f"hub dataset {hub_path!r}" + (f" ({name})" if name else "") + f" split {split!r}"
    if hub_offline():
        raise DatasetError(
            f"cannot load {where}: the Hugging Face hub is switched off (HF_HUB_OFFLINE or "
            "HF_DATASETS_OFFLINE is set); load it from files instead (load_user_file)"
        )

    rows = await asyncio.to_thread(_fetch_hub_rows, hub_path, name, split, where)
    sha = _rows_sha256({split: rows})
    loaded = await store.register_dataset(task_name, {split: rows}, sha)
    log.info("datasets.hub_loaded task=%s source=%s docs=%d loaded=%s", task_name, hub_path, len(rows), loaded)
    return _result(task_name, {split: len(rows)}, sha, loaded)


def _fetch_hub_rows(hub_path: str, name: str | None, split: str, where: str,
                    data_files: Mapping[str, list[str]] | None = None) -> list[Row]:
    reason = hub_unreachable()
    if reason is not None:
        raise DatasetError(f"cannot load {where}: the Hugging Face hub is offline: {reason}")
    try:
        # by name: the project's own datasets/ dir (data, no __init__) must not shadow it
        hf_datasets = importlib.import_module("datasets")
    except ImportError:
        raise DatasetError(f"cannot load {where}: the `datasets` package is not installed") from None
    try:
        extra = {"data_files": dict(data_files)} if data_files else {}
        data = hf_datasets.load_dataset(hub_path, name, split=split, **extra)
    except Exception as err:  # network, auth, unknown dataset/config/split...
        raise DatasetError(
            f"cannot load {where} from the Hugging Face hub (offline or unknown dataset?): "
            f"{type(err).__name__}: {err}"
        ) from err
    rows = [_row(r, f"{where} row {i}") for i, r in enumerate(data)]
    if not rows:
        raise DatasetError(f"{where} is empty")
    return rows


def _rows_sha256(splits: Mapping[str, Sequence[Row]]) -> str:
    digest = hashlib.sha256()
    for split in sorted(splits):
        digest.update(f"{split}\0".encode())
        for row in splits[split]:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
            digest.update(b"\n")
    return digest.hexdigest()


async def load_lmeval_data(
    store: DatasetRegistry, catalog: TaskCatalog, leaf: LeafTask, key: str | None = None
) -> LoadResult:
    """The dataset lm-eval reads for ``leaf`` (its config in ``catalog``: local files, the
    offline data directory, or the hub where allowed) into PostgreSQL as ``key`` (default
    the task's name), idempotently. A :class:`DatasetError` names the task, its dataset and
    where it looked."""
    from cluster.tasks.lmeval.sources import SPLIT_KEYS, data_files

    name, key = leaf.name, key or leaf.name
    cfg = await asyncio.to_thread(
        catalog.config, name, leaf.extra_overrides or None, leaf.inline, leaf.base_dir)
    files = data_files(cfg)
    if files is not None and any(isinstance(f, str) for fs in files.values() for f in fs):
        # URLs (lm-eval reads them itself; with_data_source let them through: online)
        remote = {}
        for split, urls in sorted(files.items()):
            remote[split] = await asyncio.to_thread(
                _fetch_hub_rows, str(cfg["dataset_path"]), None, split,
                f"task {name!r}: {urls[0]}", {split: [str(u) for u in urls]})
        sha = _rows_sha256(remote)
        loaded = await store.register_dataset(key, remote, sha)
        return _result(key, {s: len(r) for s, r in remote.items()}, sha, loaded)
    if files is not None:
        for paths in files.values():
            for path in paths:
                try:
                    check_data_file(path)
                except DatasetError as err:
                    raise DatasetError(f"task {name!r}: {err}") from None
        return await _load_files(store, key, files)
    hub_path = cfg.get("dataset_path")
    if not isinstance(hub_path, str):
        raise DatasetError(f"task {name!r} names no dataset_path; only tasks reading a "
                           "dataset can be measured")
    hub_name = cfg.get("dataset_name")
    splits = sorted({str(cfg[k]) for k in SPLIT_KEYS if cfg.get(k)})
    rows = {}
    for split in splits:
        where = f"task {name!r}: hub dataset {hub_path!r}" + (
            f" ({hub_name})" if hub_name else "") + f" split {split!r}"
        rows[split] = await asyncio.to_thread(
            _fetch_hub_rows, hub_path, str(hub_name) if hub_name else None, split, where)
    sha = _rows_sha256(rows)
    loaded = await store.register_dataset(key, rows, sha)
    log.info("datasets.hub_loaded task=%s source=%s splits=%s loaded=%s", key, hub_path,
             splits, loaded)
    return _result(key, {s: len(r) for s, r in rows.items()}, sha, loaded)


async def load_datasets(settings: Any, tasks: list[str] | None = None) -> list[LoadResult]:
    """The shipped task datasets (``settings.datasets_dir``) into PostgreSQL, idempotently;
    with ``tasks``, those tasks, groups (their subtasks) or tags, shipped or lm-eval's
    built-in ones (:func:`load_lmeval_data`)."""
    datasets_dir = Path(settings.datasets_dir)
    async with open_datasets(settings) as store:
        catalog = TaskCatalog.of(datasets_dir, settings.tasks_sources)
        results: list[LoadResult] = []
        if tasks is None:
            results = await load_task_datasets(store, datasets_dir, None)
            # configured tasks that are not shipped (lm-eval's built-in ones, groups): a
            # failure is the loop's to report on the pair (unmeasurable, with the reason)
            for name in [t for t in settings.tasks if not (datasets_dir / t).is_dir()]:
                try:
                    plan = await asyncio.to_thread(plan_tasks, [name], catalog)
                    for leaf in plan.leaves:
                        results.append(await load_lmeval_data(store, catalog, leaf))
                except (DatasetError, TaskError) as exc:
                    log.warning("datasets.configured_task_not_loaded task=%s reason=%s",
                                name, exc)
            return results
        for name in tasks:
            if (datasets_dir / name).is_dir():
                results += await load_task_datasets(store, datasets_dir, [name])
                continue
            plan = await asyncio.to_thread(plan_tasks, [name], catalog)
            for leaf in plan.leaves:
                if (datasets_dir / leaf.name).is_dir() and not leaf.extra_overrides:
                    results += await load_task_datasets(store, datasets_dir, [leaf.name])
                else:
                    results.append(await load_lmeval_data(store, catalog, leaf))
        return results
