"""lm-eval groups and tags as plans of leaf tasks, and a group's score as lm-eval computes it.

A group YAML (``group:``, a ``task:`` list of task, group and tag names or inline dicts,
``aggregate_metric_list``) is resolved from lm-eval's task index the way lm-eval's
``TaskFactory._build_group_members`` builds it (member overrides, group-level task
settings, tags expanded in sorted order, inline groups and tasks named ``group::name``),
without building any Task (no dataset is read): each leaf is measured as a task of its own.

:func:`aggregate_group` is ``lm_eval.api.group.Group.aggregate`` over per-task result
entries (``"acc,none"``, ``"acc_stderr,none"``, ``sample_len``): the size-weighted (or
plain) mean with lm-eval's pooled (or unweighted) stderr, filters discovered as lm-eval
discovers them. The evaluation service feeds it its runs' task results; the loop feeds it
its buffers (mean, stderr, n), so a group's score is derived from its subtasks' buffers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cluster.core.errors import TaskError
from cluster.tasks.lmeval.loading import TaskCatalog

MAX_DEPTH = 16


@dataclass(frozen=True)
class LeafTask:
    """One task a group (or a run) measures: a registered task with overrides, or a task
    defined inline in a group YAML (``inline`` is then its whole config)."""

    name: str
    overrides: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    inline: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    base_dir: Path | None = None

    @property
    def extra_overrides(self) -> dict[str, Any]:
        """The overrides that change the task (``task: <its own name>`` does not)."""
        return {k: v for k, v in (self.overrides or {}).items() if k != "task"}


@dataclass(frozen=True)
class AggregateMetric:
    """One ``aggregate_metric_list`` entry, normalised as lm-eval's ``AggMetricConfig``."""

    metric: str
    filter_list: tuple[str, ...] | None
    weight_by_size: bool


@dataclass(frozen=True)
class GroupPlan:
    name: str
    alias: str | None
    aggregate: tuple[AggregateMetric, ...] | None
    version: str
    children: tuple[GroupPlan | LeafTask, ...]

    @property
    def child_names(self) -> list[str]:
        """Names of the direct children (lm-eval's ``Group.child_names``)."""
        return [c.name for c in self.children]

    @property
    def has_aggregation(self) -> bool:
        return bool(self.aggregate)

    def leaves(self) -> list[LeafTask]:
        """Every leaf task, depth first in YAML order (lm-eval's ``get_all_tasks``)."""
        out: list[LeafTask] = []
        for child in self.children:
            out.extend(child.leaves() if isinstance(child, GroupPlan) else [child])
        return out

    def subgroups(self) -> list[GroupPlan]:
        """Every group below this one, depth first (lm-eval's ``get_all_groups``)."""
        out: list[GroupPlan] = []
        for child in self.children:
            if isinstance(child, GroupPlan):
                out += [child, *child.subgroups()]
        return out

    def bottom_up(self) -> Iterator[GroupPlan]:
        """This group and its subgroups, children before parents (lm-eval's order)."""
        for child in self.children:
            if isinstance(child, GroupPlan):
                yield from child.bottom_up()
        yield self


@dataclass(frozen=True)
class TaskPlan:
    """What a list of requested names measures: leaf tasks in order, and the groups to
    report (the requested ones; their subgroups are inside them)."""

    leaves: tuple[LeafTask, ...]
    groups: tuple[GroupPlan, ...]

    @property
    def leaf_names(self) -> list[str]:
        return [leaf.name for leaf in self.leaves]

    def all_groups(self) -> list[GroupPlan]:
        """Every group once, children before parents."""
        seen: dict[str, GroupPlan] = {}
        for root in self.groups:
            for group in root.bottom_up():
                seen.setdefault(group.name, group)
        return list(seen.values())


def _group_fields() -> set[str]:
    from lm_eval.config.group import GroupConfig

    return {f.name for f in fields(GroupConfig)}


def _group_config(catalog: TaskCatalog, name: str) -> tuple[dict[str, Any], Path | None]:
    from cluster.tasks.lmeval import _compat as lmeval_compat

    entry = catalog.entry(name)
    if entry.yaml_path is not None:
        # functions unresolved: a group's YAML runs no code; its members' YAMLs are loaded
        # (and checked) when they are measured
        raw = lmeval_compat.load_task_yaml(Path(entry.yaml_path), resolve_functions=False)
        return copy.deepcopy(raw), Path(entry.yaml_path).parent
    return copy.deepcopy(dict(entry.cfg or {})), None


def _aggregates(group: str, raw: Any) -> tuple[AggregateMetric, ...] | None:
    from lm_eval.config.group import AggMetricConfig

    if raw is None:
        return None
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        try:
            cfg = item if isinstance(item, AggMetricConfig) else AggMetricConfig(**dict(item))
        except (TypeError, ValueError) as exc:
            raise TaskError(f"group {group!r}: aggregate_metric_list entry {item!r}: {exc}"
                            ) from exc
        if callable(cfg.aggregation):
            raise TaskError(f"group {group!r}: only aggregation 'mean' is supported")
        out.append(AggregateMetric(cfg.metric, tuple(cfg.filter_list)
                                   if cfg.filter_list is not None else None,
                                   bool(cfg.weight_by_size)))
    return tuple(out)


def _build_group(catalog: TaskCatalog, name: str, raw: dict[str, Any],
                 overrides: Mapping[str, Any] | None, base_dir: Path | None, depth: int
                 ) -> GroupPlan:
    if depth > MAX_DEPTH:
        raise TaskError(f"group {name!r}: groups nested deeper than {MAX_DEPTH} (a cycle?)")
    group_keys = _group_fields()
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else None
    version = "N/A" if not metadata else str(metadata.get("version", "N/A"))
    alias = raw.get("group_alias")
    member_overrides = {**{k: v for k, v in raw.items() if k not in group_keys},
                        **(overrides or {})}
    members = raw.get("task")
    children: list[GroupPlan | LeafTask] = []
    if isinstance(members, list):
        children = _members(catalog, name, members, member_overrides, base_dir, depth)
    return GroupPlan(name=name, alias=str(alias) if alias else None,
                     aggregate=_aggregates(name, raw.get("aggregate_metric_list")),
                     version=version, children=tuple(children))


def _members(catalog: TaskCatalog, group: str, items: list[Any],
             overrides: dict[str, Any], base_dir: Path | None, depth: int
             ) -> list[GroupPlan | LeafTask]:
    children: list[GroupPlan | LeafTask] = []
    for item in items:
        if isinstance(item, str):
            base, item_overrides = item, dict(overrides)
        elif isinstance(item, dict) and "group" in item:
            sub = str(item["group"])
            if catalog.kind(sub) == "group":
                inline = {k: v for k, v in item.items() if k != "group"}
                children.append(_registered_group(catalog, sub, {**overrides, **inline},
                                                  depth + 1))
            else:
                children.append(_build_group(catalog, f"{group}::{sub}", item, overrides,
                                             base_dir, depth + 1))
            continue
        elif isinstance(item, dict) and "task" in item:
            base = str(item["task"])
            item_overrides = {**overrides, **item}
        else:
            raise TaskError(f"group {group!r}: member {item!r} is neither a name nor a dict "
                            "with 'task' or 'group'")
        kind = catalog.kind(base)
        if kind is None:
            namespaced = f"{group}::{base}"
            children.append(LeafTask(namespaced, inline={**item_overrides, "task": namespaced},
                                     base_dir=base_dir))
        elif kind == "group":
            children.append(_registered_group(catalog, base, item_overrides, depth + 1))
        elif kind == "tag":
            for task in sorted(catalog.entry(base).tags):
                children.append(LeafTask(task, overrides={"task": task, **item_overrides}))
        else:
            children.append(LeafTask(base, overrides={"task": base, **item_overrides}))
    return children


def _registered_group(catalog: TaskCatalog, name: str, overrides: Mapping[str, Any] | None,
                      depth: int) -> GroupPlan:
    raw, base_dir = _group_config(catalog, name)
    return _build_group(catalog, name, raw, overrides, base_dir, depth)


def plan_tasks(names: Sequence[str], catalog: TaskCatalog) -> TaskPlan:
    """The leaf tasks and groups that ``names`` (tasks, groups, tags) stand for.

    A leaf met twice (a task requested alone and inside a group, two groups sharing a task)
    is an error, as in lm-eval (``TaskManager._check_duplicates``)."""
    leaves: list[LeafTask] = []
    groups: list[GroupPlan] = []
    source: dict[str, str] = {}
    for name in names:
        kind = catalog.kind(name)
        if kind is None:
            raise catalog.unknown(name)
        if kind == "group":
            group = _registered_group(catalog, name, None, 0)
            groups.append(group)
            found = group.leaves()
        elif kind == "tag":
            found = [LeafTask(t) for t in sorted(catalog.entry(name).tags)]
        else:
            found = [LeafTask(name)]
        for leaf in found:
            if leaf.name in source:
                raise TaskError(f"task {leaf.name!r} is in both {source[leaf.name]!r} and "
                                f"{name!r}; run overlapping groups separately")
            source[leaf.name] = name
            leaves.append(leaf)
    return TaskPlan(tuple(leaves), tuple(groups))


def _discover_filters(group: GroupPlan, metric: str, results: Mapping[str, Mapping[str, Any]]
                      ) -> list[str]:
    found = set()
    prefix = f"{metric},"
    for leaf in group.leaves():
        for key in results.get(leaf.name, {}):
            if key.startswith(prefix) and "_stderr" not in key:
                found.add(key[len(prefix):])
    return sorted(found)


def aggregate_group(group: GroupPlan, results: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, Any]:
    """The group's entry of lm-eval's ``results`` from its leaves' entries
    (``Group.aggregate``: values, stderrs and ``sample_len`` per leaf)."""
    from lm_eval.api.metrics import (
        aggregate_subtask_metrics,
        pooled_sample_stderr,
        unweighted_mean_stderr,
    )

    out: dict[str, Any] = {"alias": group.alias or group.name, "name": group.name}
    if not group.aggregate:
        return out
    leaves = [leaf.name for leaf in group.leaves()]
    out["sample_len"] = sum(results[n].get("sample_len", 0) for n in leaves if n in results)
    sample_count: dict[str, int] = {}
    for agg in group.aggregate:
        filters = (list(agg.filter_list) if agg.filter_list is not None
                   else _discover_filters(group, agg.metric, results))
        for flt in filters:
            key, stderr_key = f"{agg.metric},{flt}", f"{agg.metric}_stderr,{flt}"
            values: list[float] = []
            stderrs: list[Any] = []
            sizes: list[int] = []
            for name in leaves:
                entry = results.get(name)
                if entry is None or key not in entry:
                    continue
                values.append(entry[key])
                sizes.append(entry.get("sample_len", 0))
                if entry.get(stderr_key) is not None:
                    stderrs.append(entry[stderr_key])
            if not values:
                continue
            out[key] = aggregate_subtask_metrics(values, sizes, agg.weight_by_size)
            sample_count[key] = sum(sizes)
            if len(stderrs) == len(values) and "N/A" not in stderrs:
                out[stderr_key] = (pooled_sample_stderr(stderrs, sizes) if agg.weight_by_size
                                   else unweighted_mean_stderr(stderrs))
            else:
                out[stderr_key] = "N/A"
    if sample_count:
        out["sample_count"] = sample_count
    return out
