"""Submitting and cancelling runs: what the API and the in-process CLI both do.

A spec is checked before a run is created, so a typo in a task name, data this deployment
cannot read or a refused custom task is a 4xx at submission, not a failed run later. Task
names are lm-eval tasks, groups or tags: a tenant's custom tasks, then the project's
``datasets/``, then lm-eval's built-in registry (``cluster/evaluations/tasks.py``).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from cluster.core.errors import DatasetError, TaskError
from cluster.core.evaluations import EvaluationRun, EvaluationSpec, RunState, TaskProgress
from cluster.core.settings import Settings
from cluster.evaluations.tasks import resolve_run_tasks
from cluster.storage.mongo import EvaluationStore
from cluster.tasks.lmeval import task_manager
from cluster.tasks.lmeval.custom import CustomTaskError

LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


class SpecError(TaskError):
    """A spec this deployment cannot run; ``param`` names the offending field."""

    def __init__(self, message: str, param: str, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def available_tasks(datasets_dir: Path) -> list[str]:
    """The lm-eval tasks of ``datasets_dir`` (tags and groups excluded)."""
    return sorted(task_manager(datasets_dir).all_subtasks)


def check_spec(spec: EvaluationSpec, settings: Settings | Path) -> list[str]:
    """The leaf tasks the spec measures; :class:`SpecError` when a name is unknown, its data
    cannot be read here, a custom task is refused, or a task needs what the API cannot give."""
    if not isinstance(settings, Settings):
        settings = Settings(datasets_dir=Path(settings))
    if spec.api == "chat-completions" and spec.apply_chat_template is False:
        raise SpecError("a chat-completions endpoint needs the chat template (its requests "
                        "are chat messages)", "apply_chat_template")
    try:
        tasks = resolve_run_tasks(spec, settings)
        configs = {leaf.name: tasks.catalog.config(leaf.name, leaf.extra_overrides or None,
                                                   leaf.inline, leaf.base_dir)
                   for leaf in tasks.plan.leaves}
    except CustomTaskError as exc:
        raise SpecError(str(exc), exc.param, exc.status) from exc
    except (TaskError, DatasetError) as exc:
        raise SpecError(str(exc), "tasks") from exc
    for task, config in configs.items():
        output_type = config.get("output_type")
        if spec.api == "chat-completions" and output_type in LOGLIKELIHOOD_TYPES:
            raise SpecError(
                f"task {task!r} needs loglikelihoods ({output_type}), which "
                "/v1/chat/completions cannot give; submit it with api 'completions'",
                "api",
            )
    return tasks.plan.leaf_names


def new_run_id() -> str:
    return secrets.token_hex(12)


def new_run(spec: EvaluationSpec, tenant: str, run_id: str, now: float,
            tasks: list[str] | None = None) -> EvaluationRun:
    """A new run; ``tasks`` are the leaf tasks :func:`check_spec` found (a group's
    subtasks), whose progress it reports (default: the requested names)."""
    return EvaluationRun(
        run_id=run_id, tenant=tenant, spec=spec, created_at=now, updated_at=now,
        progress=[TaskProgress(task=task) for task in (tasks or spec.tasks)],
    )


async def request_cancel(store: EvaluationStore, run_id: str, now: float) -> EvaluationRun | None:
    """Cancel a new or suspended run now, or ask the replica running it to stop.

    Terminal runs are left as they are (the caller tells the user). None: no such run.
    """

    def change(run: EvaluationRun) -> bool:
        if run.state.terminal or run.cancel_requested:
            return False
        run.cancel_requested = True
        if run.state in (RunState.NEW, RunState.SUSPENDED):
            run.state, run.finished_at = RunState.CANCELLED, now
        return True

    return await store.mutate(run_id, change)


async def request_suspend(store: EvaluationStore, run_id: str) -> EvaluationRun | None:
    """Suspend a new run now, or ask the replica running it to stop and leave it suspended
    (``cluster/evaluations/worker.py``). Terminal, suspended and cancelling runs are left as
    they are. None: no such run."""

    def change(run: EvaluationRun) -> bool:
        if (run.state.terminal or run.state == RunState.SUSPENDED or run.cancel_requested
                or run.suspend_requested):
            return False
        if run.state == RunState.NEW:
            run.state, run.eta_s = RunState.SUSPENDED, None
        else:
            run.suspend_requested = True
        return True

    return await store.mutate(run_id, change)


async def request_resume(store: EvaluationStore, run_id: str) -> EvaluationRun | None:
    """Make a suspended run new again (any replica claims and resumes it), or withdraw a
    suspend request its owner has not acted on yet. Other runs are left as they are. None:
    no such run."""

    def change(run: EvaluationRun) -> bool:
        if run.state == RunState.SUSPENDED:
            run.state = RunState.NEW
            return True
        if run.suspend_requested and not run.state.terminal:
            run.suspend_requested = False
            return True
        return False

    return await store.mutate(run_id, change)
