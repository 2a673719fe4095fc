"""The lm-eval adapter: lm-eval tasks as per-doc OpenAI request bodies and per-doc scores.

Public surface (internals live in the submodules and may move):
- :func:`load_task_adapter` → :class:`TaskAdapter` (``build_prompts``, ``score``, ``aggregate``)
- :class:`RequestSettings`: lm-eval's request/score knobs (defaults = lm-eval 0.4.13's)
- :func:`task_config` / :func:`load_lmeval_task`: the project's task YAMLs through lm-eval's
  TaskManager, local data paths resolved
"""

from cluster.tasks.lmeval.adapter import (
    FailedRelayError,
    RequestSettings,
    TaskAdapter,
    clear_caches,
    load_task_adapter,
)
from cluster.tasks.lmeval.fewshot import FewshotReplay
from cluster.tasks.lmeval.loading import load_lmeval_task, task_config, task_manager

__all__ = [
    "FailedRelayError",
    "FewshotReplay",
    "RequestSettings",
    "TaskAdapter",
    "clear_caches",
    "load_lmeval_task",
    "load_task_adapter",
    "task_config",
    "task_manager",
]
