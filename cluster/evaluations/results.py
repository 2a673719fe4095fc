"""A run's results in lm-eval 0.4.13's results JSON shape, and lm-eval's table of them.

``results``, ``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples`` and
``config`` are built as ``lm_eval.evaluator`` builds them (``_collect_results`` and
``simple_evaluate``): per-doc values in doc order, aggregated with the task's own aggregation
and stderr (``TaskAdapter.aggregate``). Unlike lm-eval, a failed request does not abort
the run: a doc whose answer counts against the node (node or evaluation error) scores 0 on
every metric, bench-side failures are left out, and both are reported under ``testbench``.

Groups get their entries as lm-eval's ``_to_eval_results`` gives them: ``results[group]``
from :func:`~cluster.tasks.lmeval.aggregate_group` (children before parents), ``groups``
for those with an ``aggregate_metric_list``, ``group_subtasks``, ``versions``, and
``n-shot`` / ``higher_is_better`` propagated from their children in lm-eval's order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from cluster.core.errors import ErrorCode
from cluster.core.evaluations import EvalSample, EvaluationRun
from cluster.tasks.lmeval import TaskAdapter, TaskPlan, aggregate_group
from cluster.tasks.lmeval import _compat as lmeval_compat

LMEVAL_VERSION = "0.4.13"
MAX_REPORTED_ERRORS = 5


def _json_safe(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable, ensure_ascii=False))


def task_config_dump(adapter: TaskAdapter, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The task's config as lm-eval reports it after ``simple_evaluate``'s overrides."""
    config = _json_safe(adapter.task.dump_config())
    config["num_fewshot"] = adapter.num_fewshot
    if gen_kwargs and adapter.output_type == "generate_until":
        config["generation_kwargs"] = {**(config.get("generation_kwargs") or {}), **gen_kwargs}
    return config


def task_metrics(adapter: TaskAdapter, samples: Sequence[EvalSample]) -> dict[str, Any]:
    """lm-eval's ``results[task]`` entry from the run's scored docs of that task."""
    counted = sorted(
        (s for s in samples if s.error_code.counts_against_node), key=lambda s: s.doc_id
    )
    alias = adapter.task.config.task_alias or adapter.name
    entry: dict[str, Any] = {"name": adapter.name, "alias": alias, "sample_len": len(counted)}
    if not counted:
        return entry
    for key in adapter.metric_names:
        metric, flt = key.split(",", 1)
        values = [s.metrics.get(key, 0.0) if s.error_code == ErrorCode.OK else 0.0
                  for s in counted]
        value, stderr = adapter.aggregate(key, values)
        entry[key] = value
        entry[f"{metric}_stderr,{flt}"] = "N/A" if stderr is None else stderr
    return entry


def build_results(
    run: EvaluationRun,
    adapters: dict[str, TaskAdapter],
    samples: Sequence[EvalSample],
    n_docs: dict[str, int],
    finished_at: float,
    plan: TaskPlan | None = None,
) -> dict[str, Any]:
    """The results JSON of a finished run (without per-sample records); ``adapters`` are
    its leaf tasks, ``plan`` has the groups to report."""
    spec = run.spec
    by_task: dict[str, list[EvalSample]] = {task: [] for task in adapters}
    for sample in samples:
        by_task.setdefault(sample.task, []).append(sample)
    results: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    versions: dict[str, Any] = {}
    n_shot: dict[str, int] = {}
    higher: dict[str, Any] = {}
    n_samples: dict[str, Any] = {}
    failed: dict[str, dict[str, int]] = {}
    excluded: dict[str, dict[str, int]] = {}
    errors: dict[str, list[str]] = {}
    for task in adapters:
        adapter, task_samples = adapters[task], by_task[task]
        entry = task_metrics(adapter, task_samples)
        results[task] = entry
        configs[task] = task_config_dump(adapter, dict(spec.gen_kwargs))
        versions[task] = adapter.task.VERSION
        n_shot[task] = adapter.num_fewshot
        higher[task] = adapter.task.higher_is_better()
        n_samples[task] = {"original": n_docs[task], "effective": entry["sample_len"]}
        bad = [s for s in task_samples if s.error_code != ErrorCode.OK]
        failed[task] = dict(Counter(s.error_code.name.lower() for s in bad
                                    if s.error_code.counts_against_node))
        excluded[task] = dict(Counter(s.error_code.name.lower() for s in bad
                                      if not s.error_code.counts_against_node))
        errors[task] = [f"doc {s.doc_id}: {s.error}" for s in bad[:MAX_REPORTED_ERRORS]]
    group_subtasks, groups = _add_groups(plan, results, versions, n_shot, higher)
    started = run.started_at or run.created_at
    model = "local-chat-completions" if spec.api == "chat-completions" else "local-completions"
    return _json_safe({
        "results": results,
        **({"groups": groups} if groups else {}),
        "group_subtasks": group_subtasks,
        "configs": dict(sorted(configs.items())),
        "versions": dict(sorted(versions.items())),
        "n-shot": dict(sorted(n_shot.items())),
        "higher_is_better": dict(sorted(higher.items())),
        "n-samples": n_samples,
        "config": {
            "model": model,
            "model_args": spec.lmeval_model_args(),
            "batch_size": 1,
            "batch_sizes": [],
            "device": None,
            "use_cache": None,
            "limit": spec.limit,
            "bootstrap_iters": next(iter(adapters.values())).settings.bootstrap_iters,
            "gen_kwargs": dict(spec.gen_kwargs) or None,
            "random_seed": 0,
            "numpy_seed": 1234,
            "torch_seed": 1234,
            "fewshot_seed": next(iter(adapters.values())).settings.fewshot_seed,
        },
        "date": started,
        "total_evaluation_time_seconds": str(finished_at - started),
        "lm_eval_version": LMEVAL_VERSION,
        "model_source": model,
        "model_name": spec.model,
        # prompting options under the names lm-eval's EvaluationTracker writes them
        "system_instruction": spec.system_instruction,
        "system_instruction_sha": _sha(spec.system_instruction),
        "fewshot_as_multiturn": spec.fewshot_as_multiturn,
        "testbench": {
            "run_id": run.run_id,
            "endpoint": spec.endpoint,
            "apply_chat_template": next(iter(adapters.values())).chat_template,
            "failed_docs": failed,
            "excluded_docs": excluded,
            "errors": errors,
        },
    })


def _sha(text: str | None) -> str | None:
    from lm_eval.utils import hash_string

    return hash_string(text) if text else None


def _add_groups(
    plan: TaskPlan | None,
    results: dict[str, Any],
    versions: dict[str, Any],
    n_shot: dict[str, int],
    higher: dict[str, Any],
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Group entries added in place; returns ``group_subtasks`` and ``groups``."""
    if plan is None or not plan.groups:
        return {}, {}
    for group in plan.all_groups():  # children before parents, as lm-eval aggregates
        results[group.name] = aggregate_group(group, results)
        versions[group.name] = group.version
    # lm-eval's order of its groups dict (TaskManager.load): each requested group, then
    # its subgroups depth first; propagation follows it
    ordered = list({g.name: g for root in plan.groups
                    for g in (root, *root.subgroups())}.values())
    lmeval_compat.propagate_group_fields(ordered, n_shot, higher)
    subtasks = {g.name: g.child_names for g in ordered}
    groups = {g.name: dict(results[g.name]) for g in ordered if g.has_aggregation}
    return subtasks, groups


def with_samples(results: dict[str, Any], samples: Sequence[EvalSample]) -> dict[str, Any]:
    """``results`` plus lm-eval's ``samples`` section: per task, filter-major, doc order."""
    # tasks only (``configs`` has no groups), as lm-eval's samples
    out: dict[str, list[dict[str, Any]]] = {
        task: [] for task in results.get("configs", results.get("results", {}))}
    by_task: dict[str, list[EvalSample]] = {}
    for sample in samples:
        by_task.setdefault(sample.task, []).append(sample)
    for task, task_samples in by_task.items():
        ordered = sorted(task_samples, key=lambda s: s.doc_id)
        filters: list[str] = []
        for sample in ordered:
            for record in sample.records:
                if record["filter"] not in filters:
                    filters.append(record["filter"])
        rows = out.setdefault(task, [])
        for flt in filters:
            rows.extend(r for s in ordered for r in s.records if r["filter"] == flt)
        # Failed docs have no lm-eval record; say so in the same list, after the others.
        rows.extend(
            {"doc_id": s.doc_id, "error_code": s.error_code.name.lower(), "error": s.error}
            for s in ordered if s.error_code != ErrorCode.OK
        )
    return {**results, "samples": out}


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown tables (``lm_eval.utils.make_table``): tasks, then groups."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
