"""One entry point for a (node, task) adapter, whatever the task's kind.

lm-eval tasks (``datasets/<task>/<task>.yaml`` with ``task:``) go through
:mod:`cluster.tasks.lmeval`; testbench's diffusion tasks (``kind: diffusion``) through
:mod:`cluster.tasks.diffusion`, its identity signature task (``kind: signature``) through
:mod:`cluster.tasks.signature`. Both expose ``build_prompts``, ``score``, ``aggregate``,
``metric_names`` and ``eval_split``, which is all the Sampler and Evaluator use.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from cluster.core.errors import TaskError
from cluster.core.schemas import Node
from cluster.tasks.diffusion import DiffusionTaskAdapter, diffusion_task_config
from cluster.tasks.lmeval import load_task_adapter
from cluster.tasks.signature import SignatureTaskAdapter, signature_task_config

_lock = threading.Lock()
_adapters: dict[tuple[Any, ...], Any] = {}


def task_kind(name: str, datasets_dir: Path) -> str:
    """``"diffusion"`` for testbench's diffusion tasks, ``"llm"`` for the tasks of LLM nodes
    (lm-eval's, and the signature task)."""
    return "diffusion" if diffusion_task_config(name, datasets_dir) is not None else "llm"


def load_adapter(name: str, datasets_dir: Path, node: Node) -> Any:
    """The adapter measuring task ``name`` on ``node``, cached per (task, datasets dir, and
    what of the node shapes its requests): the Sampler and Evaluator ask for it per doc
    group, and building one reads the task's YAML. A :class:`TaskError` (a task this node
    cannot be measured on, a tokenizer that cannot load) is not cached."""
    root = Path(datasets_dir).resolve()
    key = (name, root, node.kind, node.model, node.api, node.tokenizer)
    with _lock:
        adapter = _adapters.get(key)
    if adapter is None:
        adapter = _build_adapter(name, root, node)
        with _lock:
            adapter = _adapters.setdefault(key, adapter)
    return adapter


def _build_adapter(name: str, root: Path, node: Node) -> Any:
    signature = signature_task_config(name, root)
    if signature is not None:
        if node.kind == "diffusion":
            raise TaskError(f"task {name!r} is an LLM task; node {node.node_id} is a diffusion node")
        return SignatureTaskAdapter(signature, node.model, node.api)
    config = diffusion_task_config(name, root)
    if config is None:
        if node.kind == "diffusion":
            raise TaskError(f"task {name!r} is an LLM task; node {node.node_id} is a diffusion node")
        return load_task_adapter(name, root, node.tokenizer, node.api, node.model)
    if node.kind != "diffusion":
        raise TaskError(f"task {name!r} is a diffusion task; node {node.node_id} is an LLM node")
    return DiffusionTaskAdapter(config, node.model)
