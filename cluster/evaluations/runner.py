"""Executing one evaluation run: a full, resumable pass over the first ``limit`` docs.

The measuring loop's parts do the work: docs come from PostgreSQL (the Sampler's
``DatasetStore``), requests from the lm-eval :class:`~cluster.tasks.lmeval.TaskAdapter`,
HTTP from the :class:`~cluster.nodes.requester.Requester` (its limits, SLA timeouts, retries and
error codes; relays recorded in MongoDB before they are used), scores as the Evaluator
makes them. Instead of rolling buffers a run walks its docs in chunks and records one
sample per doc.

Resume: a doc's relays are keyed by run, task, doc and request index, and its sample by
run, task and doc. A restarted (or suspended and resumed) run skips docs already scored and
sends only the requests of the others that have no recorded relay. Each request is its own
Requester call, so its relay is recorded the moment it is answered: only requests in flight
when a run stops are sent again.

Progress: a :class:`~cluster.evaluations.progress.ProgressMeter` counts answered requests
and scored docs; a flusher writes it every ``evaluations.progress_every_s`` while it
changes (percent, docs, ETA). The run is scheduled until its tasks are loaded and counted,
then running.

Endpoint policy: with ``guards`` (the evaluation service: one per tenant,
``cluster/evaluations/endpoints.py``) every request goes through the run's tenant's guard;
without, through the Requester's own (the operator's allowlist).

lm-eval's Task machinery and the tokenizer are CPU-bound and not async: that work runs on
one worker thread (``offload``), so the event loop keeps serving HTTP meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from cluster.core.errors import DatasetError, ErrorCode, TestbenchError
from cluster.core.evaluations import EvalSample, EvaluationRun, EvaluationSpec, TaskProgress
from cluster.core.schemas import Node, Prompt, Relay
from cluster.core.settings import Settings
from cluster.evaluations.paired import with_paired
from cluster.evaluations.progress import ProgressMeter
from cluster.evaluations.results import build_results
from cluster.evaluations.scoring import build_doc_prompts, score_doc
from cluster.evaluations.tasks import load_leaf_data, resolve_run_tasks
from cluster.nodes.policy import EndpointGuard
from cluster.nodes.requester import Requester
from cluster.storage.connections import StoreConnections
from cluster.storage.mongo import EvaluationStore
from cluster.tasks.lmeval import (
    LeafTask,
    RequestSettings,
    TaskAdapter,
    TaskCatalog,
    load_task_adapter,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class RunFailedError(TestbenchError):
    """The run cannot produce results (e.g. the endpoint answered no request at all)."""


class LeaseLostError(TestbenchError):
    """Another replica took the run over (this one stalled past its lease): stop quietly."""


class RunReporter(Protocol):
    """Where a run's progress and log lines go (MongoDB; the CLI also draws a bar)."""

    async def progress(self, task: str, done: int, total: int, failed: int) -> None: ...

    async def meter(
        self, progress: list[TaskProgress], percent: float, eta_s: float | None, now: float,
        running: bool,
    ) -> None: ...

    async def log(self, message: str, level: str = "info") -> None: ...


class RelayRecorder:
    """The Requester's relay sink: the evaluation relays collection, first-wins."""

    def __init__(self, store: EvaluationStore) -> None:
        self._store = store

    async def record_relays(self, relays: list[Relay]) -> None:
        # Shielded: a run stopped (suspend, cancel) while an answer is being written still
        # keeps that answer, and does not send its request again when it resumes.
        await asyncio.shield(self._store.relays.record_relays(relays))


def _chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class EvaluationRunner:
    """Runs evaluation runs with shared parts: one Requester, one lm-eval thread."""

    def __init__(
        self,
        settings: Settings,
        stores: StoreConnections,
        store: EvaluationStore,
        requester: Requester,
        executor: Executor,
        clock: Callable[[], float] = time.time,
        guards: Callable[[str], EndpointGuard] | None = None,
    ) -> None:
        self._settings = settings
        self._stores = stores
        self._store = store
        self._requester = requester
        self._executor = executor
        self._clock = clock
        self._guards = guards
        self._flush_lock = asyncio.Lock()

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _adapter(self, spec: EvaluationSpec, leaf: LeafTask, catalog: TaskCatalog
                 ) -> TaskAdapter:
        return load_task_adapter(
            leaf.name, catalog, spec.tokenizer, spec.api, spec.model,
            # one request per instance: the run's lm-eval `samples` records are rebuilt
            # per request (scoring._answered_instances), as lm-eval logs them
            RequestSettings(num_fewshot=spec.num_fewshot, batch_doc_requests=False,
                            apply_chat_template=spec.apply_chat_template,
                            system_instruction=spec.system_instruction,
                            fewshot_as_multiturn=spec.fewshot_as_multiturn),
            leaf=leaf,
        )

    async def run(self, run: EvaluationRun, reporter: RunReporter) -> dict[str, Any]:
        """Measure every requested doc (resuming), then return lm-eval's results JSON."""
        spec = run.spec
        node = spec.node(run.run_id)
        guard = self._guards(run.tenant) if self._guards is not None else None
        # groups and tags as their leaf tasks, custom task folders written and checked
        tasks = await self.offload(resolve_run_tasks, spec, self._settings)
        meter = ProgressMeter(tasks.plan.leaf_names, self._clock)
        datasets = await self._stores.datasets()
        adapters: dict[str, TaskAdapter] = {}
        wanted: dict[str, list[int]] = {}
        n_docs: dict[str, int] = {}
        scored: dict[str, dict[int, ErrorCode]] = {}
        keys: dict[str, str] = {}
        for leaf in tasks.plan.leaves:
            task = leaf.name
            adapter = adapters[task] = await self.offload(
                self._adapter, spec, leaf, tasks.catalog)
            await load_leaf_data(datasets, tasks, leaf)  # a no-op once loaded
            keys[task] = tasks.dataset_key(leaf)
            ids = await datasets.doc_ids(keys[task], adapter.eval_split)
            if not ids:
                raise DatasetError(
                    f"task {task!r} has no docs in split {adapter.eval_split!r}: "
                    "run `testbench datasets load`"
                )
            n_docs[task] = len(ids)
            # lm-eval's --limit: the first N docs of the eval split, in order.
            wanted[task] = ids[: spec.limit] if spec.limit is not None else ids
            # Every task's total up front, with what a previous attempt already scored.
            scored[task] = await self._store.scored_docs(run.run_id, task)
            done = [d for d in wanted[task] if d in scored[task]]
            meter.counted(task, len(wanted[task]), len(done),
                          sum(1 for d in done if scored[task][d] != ErrorCode.OK))
        meter.start()
        await self._flush(meter, reporter)  # every total known: scheduled -> running
        flusher = asyncio.create_task(self._flush_every(meter, reporter))
        try:
            for task in adapters:
                await self._run_task(run, node, adapters[task], wanted[task], scored[task],
                                     reporter, meter, guard, keys[task])
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        if meter.failure is not None:
            raise meter.failure
        await self._flush(meter, reporter)
        samples = await self._store.samples(run.run_id)
        ok = [s for s in samples if s.error_code == ErrorCode.OK]
        if samples and not ok:
            example = next((s.error for s in samples if s.error), "no answer")
            raise RunFailedError(
                f"every one of {len(samples)} docs failed; e.g. {example[:300]}"
            )
        results = await self.offload(
            build_results, run, adapters, samples, n_docs, float(self._clock()), tasks.plan
        )
        # beside lm-eval's scores, labelled: the paired estimates against the reference
        return await with_paired(results, await self._stores.mongo(), run, samples)

    async def _flush(self, meter: ProgressMeter, reporter: RunReporter) -> None:
        """Write the meter (one write at a time, newest counts last)."""
        async with self._flush_lock:
            meter.dirty = False
            await reporter.meter(meter.progress(), meter.percent(), meter.eta_s(),
                                 float(self._clock()), running=True)

    async def _flush_every(self, meter: ProgressMeter, reporter: RunReporter) -> None:
        """Write the meter every ``progress_every_s`` while it changes. A lost lease ends
        the run (the next doc raises it); other write failures wait for the next turn."""
        every = self._settings.evaluations.progress_every_s
        while True:
            await asyncio.sleep(every)
            if not meter.dirty:
                continue
            try:
                await self._flush(meter, reporter)
            except LeaseLostError as exc:
                meter.failure = exc
                return
            except Exception:  # noqa: BLE001 - progress is retried on the next turn
                meter.dirty = True
                log.warning("evaluations.progress_write_failed", exc_info=True)

    async def _run_task(
        self,
        run: EvaluationRun,
        node: Node,
        adapter: TaskAdapter,
        doc_ids: list[int],
        scored: dict[int, ErrorCode],
        reporter: RunReporter,
        meter: ProgressMeter,
        guard: EndpointGuard | None,
        dataset: str | None = None,
    ) -> None:
        task, total = adapter.name, len(doc_ids)
        done = sum(1 for d in doc_ids if d in scored)
        failed = sum(1 for d in doc_ids if d in scored and scored[d] != ErrorCode.OK)
        remaining = [d for d in doc_ids if d not in scored]
        if done:
            await reporter.log(f"{task}: resuming, {done}/{total} docs already scored")
        elif remaining:
            await reporter.log(
                f"{task}: {total} docs, {adapter.num_fewshot}-shot, {adapter.output_type}"
            )
        datasets = await self._stores.datasets()
        for chunk in _chunks(remaining, self._settings.evaluations.chunk_docs):
            docs = await datasets.fetch_docs(dataset or task, adapter.eval_split, chunk)
            now = float(self._clock())
            prompts: dict[int, list[Prompt]] = await self.offload(
                self._build_chunk, adapter, node, docs, chunk, now, run.spec.gen_kwargs
            )
            recorded = await self._store.relays.get_for_prompts(
                [p.prompt_id for ps in prompts.values() for p in ps]
            )
            samples = await asyncio.gather(*(
                self._measure_doc(run, node, adapter, d, docs[d], prompts[d], recorded,
                                  meter, guard)
                for d in chunk
            ))
            done += len(samples)
            failed += sum(1 for s in samples if s.error_code != ErrorCode.OK)
        if remaining:
            await reporter.log(f"{task}: done, {done}/{total} docs, {failed} failed")

    @staticmethod
    def _build_chunk(
        adapter: TaskAdapter,
        node: Node,
        docs: dict[int, dict[str, Any]],
        chunk: list[int],
        now: float,
        gen_kwargs: dict[str, Any],
    ) -> dict[int, list[Prompt]]:
        return {d: build_doc_prompts(adapter, node, d, docs[d], now, gen_kwargs) for d in chunk}

    async def _measure_doc(
        self,
        run: EvaluationRun,
        node: Node,
        adapter: TaskAdapter,
        doc_id: int,
        doc: dict[str, Any],
        prompts: list[Prompt],
        recorded: dict[str, Relay],
        meter: ProgressMeter,
        guard: EndpointGuard | None,
    ) -> EvalSample:
        missing = [p for p in prompts if p.prompt_id not in recorded]
        meter.doc_started(adapter.name, doc_id, len(prompts), len(prompts) - len(missing))
        fresh = await asyncio.gather(*(self._relay_one(p, node, meter, guard) for p in missing))
        by_id = {**recorded, **{r.prompt_id: r for r in fresh}}
        relays = [by_id[p.prompt_id] for p in prompts]
        sample = await self.offload(
            score_doc, adapter, run.run_id, doc_id, doc, relays, float(self._clock()),
            run.spec.gen_kwargs,
        )
        await self._store.record_samples([sample])
        meter.doc_scored(adapter.name, doc_id, failed=sample.error_code != ErrorCode.OK)
        if meter.failure is not None:
            raise meter.failure
        return sample

    async def _relay_one(
        self, prompt: Prompt, node: Node, meter: ProgressMeter, guard: EndpointGuard | None
    ) -> Relay:
        # One Requester call per request: its relay is recorded as soon as it is answered,
        # so a stopped run loses (and later sends again) only the requests in flight.
        [relay] = await self._requester.relay([prompt], {node.node_id: node}, guard)
        meter.request_answered(prompt.task, prompt.doc_id)
        return relay

