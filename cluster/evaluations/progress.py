"""A run's progress as it goes: docs scored, the answered part of docs in flight, ETA.

The runner tells the meter about every answered request and every scored doc; the meter
keeps the counts in memory and the runner's flusher writes them (one compare-and-swap write
of the run) every ``evaluations.progress_every_s`` while anything changed, so a status poll
sees the run move with each answered request, as lm-eval's own bar does, not with each
chunk of docs.

- **percent**: docs scored plus the answered share of the docs in flight, over all docs of
  all tasks (a doc of four requests with three answered counts 0.75);
- **count**: docs scored / docs to score;
- **ETA**: the work left at this attempt's rate (work done since it started / its time),
  None until this attempt has done some; a resumed run's earlier work does not speed it up.
"""

from __future__ import annotations

from collections.abc import Callable

from cluster.core.evaluations import TaskProgress


class ProgressMeter:
    """Counts of one run's attempt; ``clock`` is the runner's (seconds)."""

    def __init__(self, tasks: list[str], clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tasks = {task: TaskProgress(task=task) for task in tasks}
        self._in_flight: dict[tuple[str, int], tuple[int, int]] = {}  # answered, requests
        self._started_at = clock()
        self._units_at_start: float | None = None
        self.dirty = True
        self.failure: BaseException | None = None  # the flusher's, ending the run

    def counted(self, task: str, total: int, done: int, failed: int) -> None:
        """A task's docs are counted; ``done`` of them (``failed`` failed) were scored by an
        earlier attempt."""
        self._tasks[task] = TaskProgress(task=task, done=done, total=total, failed=failed)
        self.dirty = True

    def start(self) -> None:
        """Every task is counted: this attempt's rate is measured from here."""
        self._started_at = self._clock()
        self._units_at_start = self._units()

    def doc_started(self, task: str, doc_id: int, requests: int, answered: int) -> None:
        self._in_flight[(task, doc_id)] = (answered, max(requests, 1))
        if answered:
            self.dirty = True

    def request_answered(self, task: str, doc_id: int) -> None:
        answered, requests = self._in_flight.get((task, doc_id), (0, 1))
        self._in_flight[(task, doc_id)] = (min(answered + 1, requests), requests)
        self.dirty = True

    def doc_scored(self, task: str, doc_id: int, failed: bool) -> None:
        self._in_flight.pop((task, doc_id), None)
        item = self._tasks[task]
        item.done += 1
        item.failed += int(failed)
        self.dirty = True

    def progress(self) -> list[TaskProgress]:
        return [item.model_copy() for item in self._tasks.values()]

    def _units(self) -> float:
        done = sum(item.done for item in self._tasks.values())
        return done + sum(a / n for a, n in self._in_flight.values())

    def _total(self) -> int:
        return sum(item.total or 0 for item in self._tasks.values())

    def percent(self) -> float:
        total = self._total()
        return min(100.0, 100.0 * self._units() / total) if total else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at this attempt's rate; None before it did anything."""
        if self._units_at_start is None:
            return None
        units = self._units()
        gained, spent = units - self._units_at_start, self._clock() - self._started_at
        if gained <= 0 or spent <= 0:
            return None
        return max(0.0, (self._total() - units) * spent / gained)
