"""Tenants' own lm-eval tasks: uploaded files or a folder of the offline data volume, checked
before lm-eval reads them.

A custom task is a folder of task and group YAMLs with their data files. It comes either as
files uploaded with a run (stored in the run, bounded by ``evaluations.max_custom_task_bytes``,
written once per content under ``<cache_dir>/custom_tasks/<sha256>/`` by
:func:`materialize`), or as a folder under ``tasks_sources.offline_data_dir``
(:func:`volume_folder`). Its names then resolve before the project's and lm-eval's own
(:class:`~cluster.tasks.lmeval.TaskCatalog` ``include_dirs``).

Loading a YAML with lm-eval imports the Python its ``!function`` tags name, and lm-eval
renders templates with an unsandboxed Jinja environment; so before anything is loaded,
:func:`check_task_folder` reads each YAML without resolving functions and refuses, unless
``tasks_sources.allow_code_execution`` is on:

- ``!function`` tags, ``class:`` (a Python task), ``.py`` files, ``unsafe_code``,
  ``trust_remote_code``, metrics lm-eval would fetch from Hugging Face ``evaluate``
  (unregistered names, ``hf_evaluate``), the ``custom`` filter, aggregations other than
  lm-eval's registered ones;
- templates that reach private attributes (``x.__class__``, ``x['_y']``, ``|attr``), the
  way out of a Jinja sandbox;

and always: ``include`` or data paths outside the folder, unknown task fields (lm-eval's
``TaskConfig``), unsupported ``output_type``s. Every refusal is a
:class:`CustomTaskError` naming the file and the field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from cluster.core.errors import TaskError
from cluster.core.settings import TaskSourceSettings

DATA_SUFFIXES = frozenset({".jsonl", ".json", ".csv", ".parquet"})
YAML_SUFFIXES = frozenset({".yaml", ".yml"})
SUPPORTED_OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "generate_until")
TEMPLATE_FIELDS = ("doc_to_text", "doc_to_target", "doc_to_choice", "description",
                   "gen_prefix", "doc_to_decontamination_query", "use_prompt")
STRUCTURAL_FIELDS = frozenset({"tag", "group", "task_list", "include"})
MAX_FILES = 64
_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_CODE = "tasks_sources.allow_code_execution: false"


class CustomTaskError(TaskError):
    """A custom task refused; ``param`` names where (``custom_tasks.0.files.x.yaml``)."""

    def __init__(self, message: str, param: str, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class _Function:
    """A ``!function`` tag, read but not resolved."""

    target: str


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(
    str(loader.construct_scalar(node))))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- uploads
def decode_files(files: Mapping[str, str], max_bytes: int, param: str) -> dict[str, bytes]:
    """Uploaded files (relative path → base64) as bytes, checked: plain relative paths,
    known suffixes, at most :data:`MAX_FILES` files of ``max_bytes`` in all (status 413)."""
    if not files:
        raise CustomTaskError("an uploaded custom task needs files (YAML and data)", param)
    if len(files) > MAX_FILES:
        raise CustomTaskError(f"at most {MAX_FILES} files per custom task", param, 413)
    out: dict[str, bytes] = {}
    total = 0
    for name, content in files.items():
        where = f"{param}.files.{name}"
        parts = PurePosixPath(name).parts
        if not parts or not all(_PATH_PART.match(p) for p in parts):
            raise CustomTaskError(f"file name {name!r}: relative path of letters, digits, "
                                  "'_', '-', '.' parts (no '..', no leading '/')", where)
        suffix = PurePosixPath(name).suffix.lower()
        if suffix not in DATA_SUFFIXES | YAML_SUFFIXES | {".py"}:
            raise CustomTaskError(f"file {name!r}: not a task YAML or data file "
                                  f"({', '.join(sorted(DATA_SUFFIXES | YAML_SUFFIXES))})", where)
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise CustomTaskError(f"file {name!r}: content is not base64", where) from None
        total += len(data)
        if total > max_bytes:
            raise CustomTaskError(
                f"uploaded custom task files exceed this deployment's limit of {max_bytes} "
                "bytes (evaluations.max_custom_task_bytes)", param, 413)
        out["/".join(parts)] = data
    if not any(PurePosixPath(n).suffix.lower() in YAML_SUFFIXES for n in out):
        raise CustomTaskError("an uploaded custom task needs at least one task YAML", param)
    return out


def files_digest(files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{len(files[name])}\0".encode())
        digest.update(files[name])
    return digest.hexdigest()


def materialize(files: Mapping[str, bytes], cache_dir: Path) -> Path:
    """The uploaded files as a folder, ``<cache_dir>/custom_tasks/<sha256>/`` (written once,
    atomically: every replica running the run writes the same bytes to the same place)."""
    folder = Path(cache_dir) / "custom_tasks" / files_digest(files)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=folder.parent))
    try:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        os.replace(staging, folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def volume_folder(sources: TaskSourceSettings, relative: str, param: str) -> Path:
    """A tenant-named folder of the offline data volume (never outside it)."""
    root = sources.offline_data_dir
    if root is None:
        raise CustomTaskError("this deployment has no offline data volume "
                              "(tasks_sources.offline_data_dir)", param)
    parts = PurePosixPath(relative).parts
    if not parts or not all(_PATH_PART.match(p) for p in parts):
        raise CustomTaskError(f"volume path {relative!r}: a relative path inside the volume",
                              param)
    base = Path(root).resolve()
    folder = (base / Path(*parts)).resolve()
    if not folder.is_relative_to(base) or not folder.is_dir():
        raise CustomTaskError(f"no folder {relative!r} on the offline data volume", param)
    return folder


# ---------------------------------------------------------------------- checks
def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")


def unsafe_template(text: str) -> str | None:
    """Why a Jinja template could reach past the doc's data (None: it cannot)."""
    from jinja2 import Environment, TemplateSyntaxError, nodes

    if "{" not in text:
        return None
    try:
        tree = Environment().parse(text)
    except TemplateSyntaxError as exc:
        return f"not a valid template: {exc.message}"
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name)):
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            return f"reads the private attribute {node.attr!r}"
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and (
                isinstance(node.arg.value, str) and node.arg.value.startswith("_")):
            return f"reads the private item {node.arg.value!r}"
        if isinstance(node, nodes.Filter) and node.name == "attr":
            return "uses the attr filter"
        if isinstance(node, nodes.Name) and node.name.startswith("_"):
            return f"names {node.name!r}"
    return None


def _load(path: Path, folder: Path, param: str, seen: set[Path]) -> dict[str, Any]:
    where = f"{param}.files.{path.relative_to(folder).as_posix()}"
    if path in seen:
        raise CustomTaskError(f"{path.name}: include cycle", where)
    seen = seen | {path}
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise CustomTaskError(f"{path.name}: not valid YAML{line}: "
                              f"{getattr(exc, 'problem', None) or exc}", where) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CustomTaskError(f"{path.name}: cannot read: {exc}", where) from None
    if not isinstance(raw, dict):
        raise CustomTaskError(f"{path.name}: a task YAML is a mapping", where)
    includes = raw.pop("include", None)
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes] if includes else []:
        target = (path.parent / str(inc)).resolve()
        if Path(str(inc)).is_absolute() or not target.is_relative_to(folder):
            raise CustomTaskError(f"{path.name}: include {inc!r} leaves the task's folder",
                                  f"{where}:include")
        if not target.is_file():
            raise CustomTaskError(f"{path.name}: include {inc!r} does not exist",
                                  f"{where}:include")
        merged.update(_load(target, folder, param, seen))
    merged.update(raw)
    return merged


def _refuse(message: str, where: str, field: str) -> CustomTaskError:
    return CustomTaskError(f"{field}: {message}", f"{where}:{field}")


def _check_code(cfg: dict[str, Any], where: str, sources: TaskSourceSettings) -> None:
    if sources.allow_code_execution:
        return
    for field, value in _walk(cfg):
        if isinstance(value, _Function):
            raise _refuse(f"!function {value.target} runs Python code; refused ({_CODE})",
                          where, field)
    if "class" in cfg:
        raise _refuse(f"a Python task class runs code; refused ({_CODE})", where, "class")
    if cfg.get("unsafe_code"):
        raise _refuse(f"the task executes model output; refused ({_CODE})", where,
                      "unsafe_code")
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("trust_remote_code"):
        raise _refuse(f"a dataset loading script runs code; refused ({_CODE})", where,
                      "dataset_kwargs.trust_remote_code")
    for field, value in _walk(cfg):
        if isinstance(value, str) and (field.split(".")[-1].split("[")[0] in TEMPLATE_FIELDS
                                       or "{{" in value or "{%" in value):
            reason = unsafe_template(value)
            if reason is not None:
                raise _refuse(f"template {reason}; refused ({_CODE})", where, field)
    _check_registered(cfg, where)


def _check_registered(cfg: dict[str, Any], where: str) -> None:
    import lm_eval.api.metrics  # noqa: F401 - registers lm-eval's metrics
    import lm_eval.filters  # noqa: F401 - registers lm-eval's filters
    from lm_eval.api.registry import aggregation_registry, filter_registry, metric_registry

    metrics = cfg.get("metric_list") or []
    for i, item in enumerate(metrics if isinstance(metrics, list) else []):
        if not isinstance(item, dict):
            raise _refuse("each entry is a mapping with 'metric'", where, f"metric_list[{i}]")
        name = item.get("metric")
        if not isinstance(name, str) or name not in metric_registry or item.get("hf_evaluate"):
            raise _refuse(f"metric {name!r} is not one of lm-eval's registered metrics (it "
                          f"would be fetched and run from Hugging Face evaluate; {_CODE})",
                          where, f"metric_list[{i}].metric")
        agg = item.get("aggregation")
        if agg is not None and (not isinstance(agg, str) or agg not in aggregation_registry):
            raise _refuse(f"aggregation {agg!r} is not one of lm-eval's", where,
                          f"metric_list[{i}].aggregation")
    filters = cfg.get("filter_list") or []
    for i, ensemble in enumerate(filters if isinstance(filters, list) else []):
        steps = ensemble.get("filter", []) if isinstance(ensemble, dict) else []
        for j, step in enumerate(steps):
            name = step.get("function") if isinstance(step, dict) else None
            if name == "custom" or name not in filter_registry:
                raise _refuse(f"filter {name!r} is not one of lm-eval's registered filters, or "
                              f"runs code; refused ({_CODE})", where,
                              f"filter_list[{i}].filter[{j}].function")


def _check_paths(cfg: dict[str, Any], where: str, folder: Path, base: Path) -> None:
    kwargs = cfg.get("dataset_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _refuse("a mapping", where, "dataset_kwargs")
    path = cfg.get("dataset_path")
    if isinstance(path, str) and (Path(path).is_absolute() or path.startswith(".")):
        raise _refuse(f"{path!r}: a local builder (json, csv, parquet) with data_files in the "
                      "task's folder, or a hub id found on the offline volume", where,
                      "dataset_path")
    for key in ("data_files", "data_dir"):
        value = (kwargs or {}).get(key)
        listed: list[Any] = []
        if isinstance(value, dict):
            for v in value.values():
                listed += v if isinstance(v, list) else [v]
        elif value is not None:
            listed = value if isinstance(value, list) else [value]
        for item in listed:
            text = str(item)
            target = (base / text).resolve()
            if "://" in text or Path(text).is_absolute() or not target.is_relative_to(folder):
                raise _refuse(f"{text!r} is outside the task's folder", where,
                              f"dataset_kwargs.{key}")


def _check_fields(cfg: dict[str, Any], where: str) -> None:
    from lm_eval.config.task import TaskConfig

    known = {f.name for f in fields(TaskConfig)}
    unknown = sorted(set(cfg) - known - STRUCTURAL_FIELDS)
    if unknown:
        raise _refuse("not an lm-eval task field", where, unknown[0])
    output_type = cfg.get("output_type", "generate_until")
    if output_type not in SUPPORTED_OUTPUT_TYPES:
        raise _refuse(f"{output_type!r} is not one of {', '.join(SUPPORTED_OUTPUT_TYPES)}",
                      where, "output_type")
    if not isinstance(cfg.get("task"), str) or not cfg["task"]:
        raise _refuse("a task needs a name", where, "task")


def _check_group(cfg: dict[str, Any], where: str) -> None:
    if not isinstance(cfg.get("group"), str) or not cfg["group"]:
        raise _refuse("a group needs a name", where, "group")
    aggs = cfg.get("aggregate_metric_list")
    for i, item in enumerate(aggs if isinstance(aggs, list) else [aggs] if aggs else []):
        if not isinstance(item, dict) or not isinstance(item.get("metric"), str):
            raise _refuse("each entry is a mapping with 'metric'", where,
                          f"aggregate_metric_list[{i}]")
        if item.get("aggregation", "mean") != "mean":
            raise _refuse("only 'mean' aggregates a group", where,
                          f"aggregate_metric_list[{i}].aggregation")


def check_task_folder(folder: Path, sources: TaskSourceSettings, param: str) -> list[str]:
    """Check every YAML of a custom task folder (module docstring); returns the task and
    group names it defines. Raises :class:`CustomTaskError` naming file and field."""
    folder = Path(folder).resolve()
    names: list[str] = []
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    if not sources.allow_code_execution:
        for path in paths:
            if path.suffix == ".py":
                raise CustomTaskError(f"{path.name}: Python files run code; refused ({_CODE})",
                                      f"{param}.files.{path.relative_to(folder).as_posix()}")
    for path in paths:
        if path.suffix.lower() not in YAML_SUFFIXES:
            continue
        where = f"{param}.files.{path.relative_to(folder).as_posix()}"
        cfg = _load(path, folder, param, set())
        _check_code(cfg, where, sources)
        _check_paths(cfg, where, folder, path.parent)
        if "group" in cfg:
            _check_group(cfg, where)
            names.append(str(cfg["group"]))
        elif "task" in cfg:
            _check_fields(cfg, where)
            names.append(str(cfg["task"]))
        # else: a base that other YAMLs include (lm-eval's index skips it too)
    if not names:
        raise CustomTaskError("the custom task defines no task or group (a YAML with 'task:' "
                              "or 'group:')", param)
    return names

