"""One entry point for a (node, task) adapter, whatever the task's kind.

lm-eval tasks (``datasets/<task>/<task>.yaml`` with ``task:``) go through
:mod:`cluster.tasks.lmeval`; testbench's diffusion tasks (``kind: diffusion``) through
:mod:`cluster.tasks.diffusion`, its identity signature task (``kind: signature``) through
:mod:`cluster.tasks.signature`. Both expose ``build_prompts``, ``score``, ``aggregate``,
``metric_names`` and ``eval_split``, which is all the Sampler and Evaluator use.

An lm-eval task name resolves in the project's ``datasets/`` first, then among lm-eval's
built-in tasks (:class:`~cluster.tasks.lmeval.TaskCatalog`, from ``datasets_dir`` and
``tasks_sources``); a group or tag in the configured tasks stands for its leaf tasks
(:func:`leaf_task_names`), each measured with its own buffer.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.core.errors import TaskError
from cluster.core.schemas import Node
from cluster.core.settings import TaskSourceSettings
from cluster.tasks.diffusion import DiffusionTaskAdapter, diffusion_task_config
from cluster.tasks.lmeval import (
    GroupPlan,
    RequestSettings,
    TaskCatalog,
    load_task_adapter,
    plan_tasks,
)
from cluster.tasks.lmeval import (
    request_build_stats as request_build_stats,  # re-exported for the Sampler
)
from cluster.tasks.signature import SignatureTaskAdapter, signature_task_config

log = logging.getLogger(__name__)

_lock = threading.Lock()
_adapters: dict[tuple[Any, ...], Any] = {}


def catalog_of(settings: Any) -> TaskCatalog:
    """The task catalog of a deployment's settings (``datasets_dir``, ``tasks_sources``);
    the Sampler and Evaluator ask for it per doc group, so it is built once."""
    return _catalog_of(Path(settings.datasets_dir), settings.tasks_sources)


@functools.lru_cache(maxsize=64)
def _catalog_of(datasets_dir: Path, sources: TaskSourceSettings) -> TaskCatalog:
    return TaskCatalog.of(datasets_dir, sources)


def _catalog(where: TaskCatalog | Path) -> TaskCatalog:
    return where if isinstance(where, TaskCatalog) else TaskCatalog.of(where)


def node_request_settings(node: Node) -> RequestSettings:
    """The prompting options a node was registered with (chat template, system
    instruction, few-shot turns), as lm-eval's request settings."""
    return RequestSettings(apply_chat_template=node.apply_chat_template,
                           system_instruction=node.system_instruction,
                           fewshot_as_multiturn=node.fewshot_as_multiturn)


_leaves: dict[tuple[TaskCatalog, str], list[str]] = {}


def leaf_task_names(names: Sequence[str], where: TaskCatalog | Path) -> list[str]:
    """``names`` with every lm-eval group or tag replaced by its leaf tasks (in lm-eval's
    order, each once); testbench's own tasks and unknown names stay as they are (a pair of
    an unknown task is reported unmeasurable, with the reason). Cached per name."""
    catalog = _catalog(where)
    out: list[str] = []
    for name in names:
        with _lock:
            found = _leaves.get((catalog, name))
        if found is None:
            found = [name]
            native = (signature_task_config(name, catalog.datasets_dir) is not None
                      or diffusion_task_config(name, catalog.datasets_dir) is not None)
            if not native:
                try:
                    if catalog.kind(name) in ("group", "tag"):
                        found = plan_tasks([name], catalog).leaf_names
                except TaskError as exc:
                    log.warning("tasks.expand_failed name=%s reason=%s", name, exc)
            with _lock:
                _leaves[(catalog, name)] = found
        out += [t for t in found if t not in out]
    return out


def configured_groups(names: Sequence[str], where: TaskCatalog | Path) -> list[GroupPlan]:
    """The lm-eval groups among ``names`` (the configured tasks), resolved; testbench's own
    tasks are skipped without consulting lm-eval, a name that does not resolve is skipped."""
    catalog = _catalog(where)
    groups: list[GroupPlan] = []
    for name in names:
        if (signature_task_config(name, catalog.datasets_dir) is not None
                or diffusion_task_config(name, catalog.datasets_dir) is not None):
            continue
        try:
            if catalog.kind(name) == "group":
                groups += plan_tasks([name], catalog).groups
        except TaskError as exc:
            log.warning("tasks.group_unresolved name=%s reason=%s", name, exc)
    return groups


def task_kind(name: str, datasets_dir: Path) -> str:
    """``"diffusion"`` for testbench's diffusion tasks, ``"llm"`` for the tasks of LLM nodes
    (lm-eval's, and the signature task)."""
    return "diffusion" if diffusion_task_config(name, datasets_dir) is not None else "llm"


def load_adapter(name: str, datasets_dir: TaskCatalog | Path, node: Node) -> Any:
    """The adapter measuring task ``name`` on ``node``, cached per (task, catalog, and
    what of the node shapes its requests): the Sampler and Evaluator ask for it per doc
    group, and building one reads the task's YAML. A :class:`TaskError` (a task this node
    cannot be measured on, a tokenizer that cannot load) is not cached."""
    catalog = _catalog(datasets_dir)
    key = (name, catalog, node.kind, node.model, node.api, node.tokenizer,
           node_request_settings(node))
    with _lock:
        adapter = _adapters.get(key)
    if adapter is None:
        adapter = _build_adapter(name, catalog, node)
        with _lock:
            adapter = _adapters.setdefault(key, adapter)
    return adapter


def _build_adapter(name: str, catalog: TaskCatalog, node: Node) -> Any:
    root = catalog.datasets_dir
    signature = signature_task_config(name, root)
    if signature is not None:
        if node.kind == "diffusion":
            raise TaskError(f"task {name!r} is an LLM task; node {node.node_id} is a diffusion node")
        return SignatureTaskAdapter(signature, node.model, node.api)
    config = diffusion_task_config(name, root)
    if config is None:
        if node.kind == "diffusion":
            raise TaskError(f"task {name!r} is an LLM task; node {node.node_id} is a diffusion node")
        return load_task_adapter(name, catalog, node.tokenizer, node.api, node.model,
                                 node_request_settings(node))
    if node.kind != "diffusion":
        raise TaskError(f"task {name!r} is a diffusion task; node {node.node_id} is an LLM node")
    return DiffusionTaskAdapter(config, node.model)


def warm_adapters(pairs: Sequence[tuple[Node, str]], datasets_dir: TaskCatalog | Path) -> int:
    """Build the adapters of these (node, task) pairs now: lm-eval's imports, tasks and
    tokenizers take seconds, better spent before the first doc than on it. One that
    cannot be built is left for the real call to report on its pair. Returns how many
    were built."""
    built = 0
    for node, task in pairs:
        try:
            load_adapter(task, datasets_dir, node)
            built += 1
        except Exception:  # noqa: BLE001 - reported where it matters, on the pair
            log.debug("warm_up.skipped node=%s task=%s", node.node_id, task, exc_info=True)
    return built
