"""The lm-eval internals testbench builds on (pinned: ``lm-eval[api]==0.4.13``).

This module is the only user of lm-eval's private API: underscore names of its classes and
modules. Requests must be exactly the ones lm-eval's ``local-completions`` /
``local-chat-completions`` send (``TemplateAPI._create_payload`` with the model's
``_seed``, ``TemplateLM._encode_pair``, the default ``_max_gen_toks``), and per-doc scores
must go through the task's own filter ensembles and metric list (``ConfigurableTask._filters``,
``_metric_fn_list``), which lm-eval publishes no other way. Everything else imports the
public-named wrappers below, so an lm-eval upgrade that moves one breaks this module (the
score-parity tests, ``tests/cluster/tasks/test_parity_lmeval.py``, reach it through the
adapter), not the adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.api.filter import FilterEnsemble
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.api_models import TemplateAPI
    from lm_eval.tasks import TaskManager


def encode_pair(lm: TemplateAPI, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval's ``loglikelihood`` splits them."""
    context_enc, continuation_enc = lm._encode_pair(context, continuation)
    return context_enc, continuation_enc


def request_payload(
    lm: TemplateAPI, messages: Any, *, generate: bool, gen_kwargs: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON body lm-eval's ``model_call`` posts for ``messages`` (the output of
    ``lm.create_message``), with the model's seed and EOS string."""
    body: dict[str, Any] = lm._create_payload(
        messages, generate=generate, gen_kwargs=gen_kwargs, seed=lm._seed, eos=lm.eos_string
    )
    return body


def default_max_gen_toks(lm: TemplateAPI) -> int:
    """``max_gen_toks`` of a request that names none (the model's ``max_gen_toks`` arg)."""
    return int(lm._max_gen_toks)


def filter_ensembles(task: ConfigurableTask) -> list[FilterEnsemble]:
    """The task's filter ensembles, in the order lm-eval applies them."""
    return list(task._filters)


def metric_names(task: ConfigurableTask) -> list[str]:
    """The names of the task's metrics (``process_results`` keys), in config order."""
    return list(task._metric_fn_list)


def load_task_yaml(path: Path, resolve_functions: bool = True) -> dict[str, Any]:
    """A task YAML as lm-eval reads it: ``include``s merged, ``!function``s resolved
    (imported: code runs) or, with ``resolve_functions=False``, left as path strings."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config: dict[str, Any] = load_yaml(path, resolve_func=resolve_functions)
    return config


def propagate_group_fields(
    groups: list[Any], n_shot: dict[str, int], higher_is_better: dict[str, dict[str, bool]]
) -> None:
    """Give groups the ``n-shot`` and ``higher_is_better`` lm-eval's results give them
    (from their children's; ``evaluator_utils._propagate_*``, which read only each group's
    ``name`` and ``child_names``)."""
    from lm_eval.evaluator_utils import _propagate_higher_is_better, _propagate_num_fewshot

    _propagate_higher_is_better(groups, higher_is_better)
    _propagate_num_fewshot(groups, n_shot)


def builtin_task_manager(include_paths: list[str]) -> TaskManager:
    """``TaskManager(include_path=include_paths)`` with lm-eval's built-in tasks, its index
    of those read from a JSON cache (:func:`_builtin_index`): indexing ~14k YAMLs takes
    6-9 s per process on a 2-core machine, reading the cache ~1 s. The built-in entries
    are merged under the included folders' as ``TaskIndex.build`` merges paths (a later
    path's name replaces an earlier one's), which is lm-eval's own precedence."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    manager = TaskManager(include_path=include_paths, include_defaults=False)
    merged = {**_builtin_index(), **manager._index}
    manager._index = merged
    kinds: dict[Any, list[str]] = {}
    for name, entry in merged.items():
        kinds.setdefault(entry.kind, []).append(name)
    manager._all_tasks = sorted(merged)
    manager._all_subtasks = sorted(kinds.get(Kind.TASK, []) + kinds.get(Kind.PY_TASK, []))
    manager._all_groups = sorted(kinds.get(Kind.GROUP, []))
    manager._all_tags = sorted(kinds.get(Kind.TAG, []))
    return manager


def _index_cache_path(root: Path) -> Path:
    import lm_eval

    version = getattr(lm_eval, "__version__", "unknown")
    key = hashlib.sha256(f"{version}|{root}|{root.stat().st_mtime_ns}".encode()).hexdigest()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "testbench" / f"lmeval-index-{version}-{key[:16]}.json"


def cache_packages_distributions() -> None:
    """``importlib.metadata.packages_distributions`` answered from a JSON cache, keyed by
    the state of the ``site-packages`` folders on ``sys.path``. transformers calls it when
    it is imported (``transformers/utils/import_utils.py``), and it reads the metadata of
    every installed distribution: 0.6-1.4 s with vllm's dependencies installed, paid by
    each loop process that builds a tokenizer (the Sampler, on the way to the first
    request: its warm-up took 5.3 s, 2.9-3.4 s with the cache). The mapping is a function
    of what is installed, which changes the folders' mtimes; the result is a plain
    ``{import name: [distribution names]}``. Idempotent."""
    import importlib.metadata as metadata

    original = metadata.packages_distributions
    if getattr(original, "cached_by_testbench", False):
        return
    # the folders distributions are installed in (not the working directory, nor a Ray
    # job's code folders, whose mtimes change with the files under them)
    folders = [p for p in sys.path
               if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
    state = "|".join(f"{p}:{os.stat(p).st_mtime_ns}" for p in folders)
    key = hashlib.sha256(state.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "testbench" / f"packages-distributions-{key}.json"

    def packages_distributions() -> Mapping[str, list[str]]:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(found, dict):
                return found
        except (OSError, ValueError):
            pass
        mapping = original()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(f".{os.getpid()}.tmp")
            staging.write_text(json.dumps(mapping), encoding="utf-8")
            os.replace(staging, path)
        except OSError:
            pass  # an unwritable cache: read the metadata every time
        return mapping

    packages_distributions.cached_by_testbench = True  # type: ignore[attr-defined]
    metadata.packages_distributions = packages_distributions  # type: ignore[assignment]


def _builtin_index() -> dict[str, Any]:
    """lm-eval's ``TaskIndex`` of its own task folder, cached as JSON per lm-eval version
    and folder (functions unresolved, as the index holds them; no pickle: nothing in the
    cache runs)."""
    import lm_eval.tasks
    from lm_eval.tasks._index import Entry, Kind, TaskIndex

    root = Path(lm_eval.tasks.__file__).parent.resolve()
    path = _index_cache_path(root)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return {r["name"]: Entry(r["name"], Kind[r["kind"]],
                                 Path(r["yaml_path"]) if r["yaml_path"] else None,
                                 r["cfg"], set(r["tags"])) for r in rows}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    index = TaskIndex.build([root])
    rows = [{"name": e.name, "kind": e.kind.name,
             "yaml_path": str(e.yaml_path) if e.yaml_path else None, "cfg": e.cfg,
             "tags": sorted(e.tags)} for e in index.values()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(rows, default=str), encoding="utf-8")
        os.replace(staging, path)
    except OSError:
        pass  # an unwritable cache: index every time
    return dict(index)


_TEMPLATE_CACHE_SIZE = 4096
_compiled_templates: dict[str, Any] = {}
_templates_lock = threading.Lock()


def _sandboxed_env() -> Any:
    """lm-eval's Jinja environment (``lm_eval.utils.env``: loader, undefined, newline,
    filters, tests, globals) as a ``SandboxedEnvironment``: a template (a tenant's, or
    data a template indexes with) cannot reach Python internals (``__class__``, function
    globals, ``str.format`` on attributes); every other template renders the same."""
    from jinja2.sandbox import SandboxedEnvironment
    from lm_eval import utils

    base = utils.env
    env = SandboxedEnvironment(loader=base.loader, undefined=base.undefined,
                               keep_trailing_newline=base.keep_trailing_newline)
    env.filters.update(base.filters)
    env.tests.update(base.tests)
    env.globals.update(base.globals)
    return env


def compile_templates_once() -> None:
    """Make lm-eval render each Jinja template from one compiled copy, sandboxed.

    ``lm_eval.utils.apply_template`` compiles its template string on every call
    (``env.from_string``): every ``doc_to_text``/``doc_to_target``/few-shot context of
    every doc recompiles the same few templates, which profiled at 40-75% of the Sampler's
    and Evaluator's CPU. The replacement compiles each string once with lm-eval's own
    ``env`` settings in a sandbox (:func:`_sandboxed_env`; tenants' tasks are templates
    too) and renders it as the original does, so every prompt is unchanged (the
    score-parity tests compare them with lm-eval's own runs). Idempotent."""
    from lm_eval import utils

    if getattr(utils.apply_template, "_testbench_cached", False):
        return
    env = _sandboxed_env()

    def apply_template(template: str, doc: dict[str, Any]) -> str:
        compiled = _compiled_templates.get(template)
        if compiled is None:
            compiled = env.from_string(template)
            with _templates_lock:
                if len(_compiled_templates) >= _TEMPLATE_CACHE_SIZE:
                    _compiled_templates.clear()
                _compiled_templates[template] = compiled
        rendered: str = compiled.render(**doc)
        return rendered

    apply_template._testbench_cached = True  # type: ignore[attr-defined]
    utils.apply_template = apply_template


# tokenizer_class values that AutoTokenizer resolves to the generic fast tokenizer class
_GENERIC_FAST = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


class _DirectFastTokenizer:
    """Stands in for ``transformers.AutoTokenizer`` while lm-eval builds its client.

    ``AutoTokenizer`` imports transformers' whole model registry (and, through its
    generation utilities, scikit-learn): 6-7 s of every Sampler's and Evaluator's start on
    this machine, before the first request can leave. When the tokenizer directory names
    the generic fast tokenizer class, which is what ``AutoTokenizer`` would instantiate
    from it, that class is loaded directly: same class, same files, same token ids
    (``tests/cluster/tasks/test_lmeval_adapter.py`` compares them). Anything else goes
    to the real ``AutoTokenizer``."""

    @staticmethod
    def from_pretrained(name: str, *args: Any, **kwargs: Any) -> Any:
        import transformers

        config = Path(str(name)).expanduser() / "tokenizer_config.json"
        tokenizer_class = None
        if not args and kwargs.get("use_fast", True) and config.is_file():
            try:
                tokenizer_class = json.loads(config.read_text()).get("tokenizer_class")
            except (OSError, ValueError):
                tokenizer_class = None
        if tokenizer_class in _GENERIC_FAST and not kwargs.get("trust_remote_code"):
            from transformers import PreTrainedTokenizerFast

            options = {k: v for k, v in kwargs.items()
                       if k not in ("use_fast", "trust_remote_code") and v is not None}
            return PreTrainedTokenizerFast.from_pretrained(name, **options)
        transformers.__dict__.pop("AutoTokenizer", None)  # the real one, imported lazily
        try:
            return transformers.AutoTokenizer.from_pretrained(name, *args, **kwargs)
        finally:
            transformers.__dict__["AutoTokenizer"] = _DirectFastTokenizer


@contextmanager
def direct_fast_tokenizers() -> Iterator[None]:
    """While lm-eval builds a client, load generic fast tokenizers without importing
    transformers' model registry (:class:`_DirectFastTokenizer`)."""
    import transformers

    had = "AutoTokenizer" in transformers.__dict__
    previous = transformers.__dict__.get("AutoTokenizer")
    transformers.__dict__["AutoTokenizer"] = _DirectFastTokenizer
    try:
        yield
    finally:
        if had:
            transformers.__dict__["AutoTokenizer"] = previous
        else:
            transformers.__dict__.pop("AutoTokenizer", None)
