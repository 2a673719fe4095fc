"""Few-shot examples of doc ``i`` as a pure function of ``i``, identical to a full lm-eval run.

lm-eval seeds one ``random.Random(fewshot_seed)`` per task (``set_fewshot_seed``) and its
sampler draws from it once per eval doc, in doc order (``build_all_requests`` →
``fewshot_context`` → ``sampler.sample``). So the few-shot examples of doc ``i`` come from
the generator's state after the draws of docs ``0..i-1``. :class:`FewshotReplay` rebuilds
that state by replaying those draws with lm-eval's own sampler on a fresh generator, and
keeps a checkpoint every ``every`` docs so a doc costs at most ``every`` replayed draws;
by default ``every`` is the smallest step that keeps at most ``MAX_CHECKPOINTS`` generator
states (about 2.5 KB each): one per doc for tasks of up to that many docs.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.api.task import ConfigurableTask


MAX_CHECKPOINTS = 4096


def _eval_doc_count(task: ConfigurableTask) -> int:
    try:
        return len(task.eval_docs)
    except Exception:  # noqa: BLE001 - a task without loaded docs: the step is a guess
        return 64 * MAX_CHECKPOINTS


class FewshotReplay:
    def __init__(
        self, task: ConfigurableTask, *, seed: int, num_fewshot: int, every: int | None = None
    ) -> None:
        self._task = task
        self._seed = seed
        self._n = num_fewshot
        if every is None:
            every = max(1, -(-_eval_doc_count(task) // MAX_CHECKPOINTS))
        self._every = every
        self._checkpoints: list[Any] = [random.Random(seed).getstate()]
        self.lock = threading.RLock()
        # lm-eval passes the eval doc to the sampler (to exclude it) only when the few-shot
        # split is the eval split; then each draw depends on the doc, which we read back
        # from the task's own eval docs.
        self._uses_eval_doc = task.fewshot_cfg.split == task.config.test_split
        self._eval_docs: Any = None

    def _eval_doc(self, doc_id: int) -> dict[str, Any] | None:
        if not self._uses_eval_doc:
            return None
        if self._eval_docs is None:
            self._eval_docs = self._task.eval_docs
        return self._eval_docs[doc_id]

    def _draw(self, rnd: random.Random, doc_id: int) -> None:
        sampler = self._task.sampler
        saved = sampler.rnd
        sampler.rnd = rnd
        try:
            sampler.sample(n=self._n, eval_doc=self._eval_doc(doc_id))
        finally:
            sampler.rnd = saved

    def generator_for(self, doc_id: int) -> random.Random:
        """A generator in the state lm-eval's sampler has when it reaches doc ``doc_id``."""
        if doc_id < 0:
            raise ValueError(f"doc_id must be >= 0, got {doc_id}")
        rnd = random.Random()
        if self._n <= 0:
            rnd.setstate(self._checkpoints[0])
            return rnd
        with self.lock:
            k = doc_id // self._every
            while len(self._checkpoints) <= k:
                start = (len(self._checkpoints) - 1) * self._every
                rnd.setstate(self._checkpoints[-1])
                for j in range(start, start + self._every):
                    self._draw(rnd, j)
                self._checkpoints.append(rnd.getstate())
            rnd.setstate(self._checkpoints[k])
            for j in range(k * self._every, doc_id):
                self._draw(rnd, j)
        return rnd

    @contextmanager
    def positioned(self, doc_id: int) -> Iterator[None]:
        """Within the block, the task's sampler draws doc ``doc_id``'s few-shot examples."""
        with self.lock:
            rnd = self.generator_for(doc_id)
            sampler = getattr(self._task, "sampler", None)
            if sampler is None:
                yield
                return
            saved = sampler.rnd
            sampler.rnd = rnd
            try:
                yield
            finally:
                sampler.rnd = saved
