"""The lm-eval adapter: lm-eval tasks as per-doc OpenAI request bodies and per-doc scores.

Public surface (internals live in the submodules and may move):
- :func:`load_task_adapter` → :class:`TaskAdapter` (``build_prompts``, ``score``, ``aggregate``)
- :class:`RequestSettings`: lm-eval's request/score knobs (defaults = lm-eval 0.4.13's)
- :class:`TaskCatalog`: where task names resolve (the project's ``datasets/`` and a tenant's
  folders first, then lm-eval's built-in tasks) and where their data may come from;
  :func:`task_config` / :func:`load_lmeval_task`: a task's config and Task through lm-eval's
  TaskManager, data paths resolved (:mod:`cluster.tasks.lmeval.sources`)
- :func:`request_build_stats`: docs whose requests this process built, and their CPU time
- :func:`plan_tasks` / :func:`aggregate_group`: groups and tags as leaf tasks, and a group's
  score as lm-eval computes it
"""

from cluster.tasks.lmeval import _compat

# before anything here imports transformers (see the function)
_compat.cache_packages_distributions()

from cluster.tasks.lmeval.adapter import (  # noqa: E402
    FailedRelayError,
    RequestSettings,
    TaskAdapter,
    load_task_adapter,
    request_build_stats,
)
from cluster.tasks.lmeval.fewshot import FewshotReplay  # noqa: E402
from cluster.tasks.lmeval.groups import (  # noqa: E402
    GroupPlan,
    LeafTask,
    TaskPlan,
    aggregate_group,
    plan_tasks,
)
from cluster.tasks.lmeval.loading import (  # noqa: E402
    TaskCatalog,
    load_lmeval_task,
    task_config,
    task_manager,
)

__all__ = [
    "FailedRelayError",
    "FewshotReplay",
    "GroupPlan",
    "LeafTask",
    "RequestSettings",
    "TaskAdapter",
    "TaskCatalog",
    "TaskPlan",
    "aggregate_group",
    "load_lmeval_task",
    "load_task_adapter",
    "plan_tasks",
    "request_build_stats",
    "task_config",
    "task_manager",
]
