"""Submitting and cancelling runs: what the API and the in-process CLI both do.

A spec is checked against the tasks this deployment ships before a run is created, so a
typo in a task name is a 400 at submission, not a failed run later. Tasks are lm-eval tasks
from ``datasets_dir`` (lm-eval's TaskManager over the project's YAMLs).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from cluster.core.errors import TaskError
from cluster.core.evaluations import EvaluationRun, EvaluationSpec, RunState, TaskProgress
from cluster.storage.mongo import EvaluationStore
from cluster.tasks.lmeval import task_config, task_manager

LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


class SpecError(TaskError):
    """A spec this deployment cannot run; ``param`` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def available_tasks(datasets_dir: Path) -> list[str]:
    """The lm-eval tasks of ``datasets_dir`` (tags and groups excluded)."""
    return sorted(task_manager(datasets_dir).all_subtasks)


def check_spec(spec: EvaluationSpec, datasets_dir: Path) -> None:
    """Raise :class:`SpecError` when a task is unknown or needs what the API cannot give."""
    known = available_tasks(datasets_dir)
    for task in spec.tasks:
        if task not in known:
            raise SpecError(
                f"unknown task {task!r}; this deployment ships {', '.join(known) or 'none'}",
                "tasks",
            )
        output_type = task_config(task, datasets_dir).get("output_type")
        if spec.api == "chat-completions" and output_type in LOGLIKELIHOOD_TYPES:
            raise SpecError(
                f"task {task!r} needs loglikelihoods ({output_type}), which "
                "/v1/chat/completions cannot give; submit it with api 'completions'",
                "api",
            )


def new_run_id() -> str:
    return secrets.token_hex(12)


def new_run(spec: EvaluationSpec, tenant: str, run_id: str, now: float) -> EvaluationRun:
    return EvaluationRun(
        run_id=run_id, tenant=tenant, spec=spec, created_at=now, updated_at=now,
        progress=[TaskProgress(task=task) for task in spec.tasks],
    )


async def request_cancel(store: EvaluationStore, run_id: str, now: float) -> EvaluationRun | None:
    """Cancel a queued run now, or ask the replica running it to stop.

    Terminal runs are left as they are (the caller tells the user). None: no such run.
    """

    def change(run: EvaluationRun) -> bool:
        if run.state.terminal or run.cancel_requested:
            return False
        run.cancel_requested = True
        if run.state == RunState.QUEUED:
            run.state, run.finished_at = RunState.CANCELLED, now
        return True

    return await store.mutate(run_id, change)
