"""One evaluation run executed in this process, on the bench's stores, exactly as an API
replica executes it (``testbench eval`` without ``--server``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cluster.core.errors import TestbenchError
from cluster.core.evaluations import EvaluationRun, EvaluationSpec, RunState
from cluster.core.settings import Settings
from cluster.evaluations.endpoints import operator_guard
from cluster.evaluations.results import with_samples
from cluster.evaluations.runner import EvaluationRunner, RelayRecorder
from cluster.evaluations.runs import SpecError, check_spec, new_run, new_run_id
from cluster.evaluations.worker import StoreReporter, claim_run, finish_run, new_owner_id
from cluster.nodes.policy import EndpointRefusedError
from cluster.nodes.requester import Requester
from cluster.storage.connections import StoreConnections
from cluster.storage.mongo import EvaluationStore

LOCAL_TENANT = "local"
# A lease far beyond the run: nothing else may pick an in-process run up.
LOCAL_LEASE_S = 10 * 365 * 86400.0


async def run_here(
    settings: Settings,
    spec: EvaluationSpec,
    on_change: Callable[[EvaluationRun], None] = lambda run: None,
    on_log: Callable[[str], None] = lambda line: None,
    samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's results JSON of one run (with per-sample records when ``samples``).
    Raises :class:`TestbenchError` when the spec cannot run or the run fails; a cancelled
    or interrupted run is recorded as cancelled."""
    try:
        leaves = check_spec(spec, settings)
    except SpecError as exc:
        raise TestbenchError(f"{exc.param}: {exc}") from exc
    # The operator's own run: their allowlist (requester.endpoint_allowlist) applies, here
    # and, through the Requester built below, to every connection of the run.
    try:
        await operator_guard(settings).check_url(spec.endpoint)
    except EndpointRefusedError as exc:
        raise TestbenchError(f"endpoint: {exc}; requester.endpoint_allowlist opens it "
                             "(e.g. TESTBENCH_REQUESTER__ENDPOINT_ALLOWLIST="
                             "'{networks: [127.0.0.0/8]}' for this machine)") from exc
    conns = StoreConnections(settings)
    executor = ThreadPoolExecutor(1, thread_name_prefix="lmeval")
    owner = new_owner_id()
    requester: Requester | None = None
    run_id = new_run_id()
    try:
        store = EvaluationStore(await conns.mongo())
        await store.ensure_indexes()
        await store.create(new_run(spec, LOCAL_TENANT, run_id, time.time(), leaves))
        claimed = await claim_run(store, run_id, owner, time.time(), lease_s=LOCAL_LEASE_S)
        assert claimed is not None
        requester = Requester(
            settings.requester.model_copy(
                update={"per_node_concurrency": settings.evaluations.per_run_concurrency}),
            RelayRecorder(store),
        )
        runner = EvaluationRunner(settings, conns, store, requester, executor)
        reporter = StoreReporter(store, run_id, owner, on_change=on_change)
        on_log(f"evaluation {run_id}: {', '.join(spec.tasks)} at {spec.endpoint}")
        try:
            results = await runner.run(claimed, reporter)
        except (asyncio.CancelledError, KeyboardInterrupt):
            await finish_run(store, run_id, owner, RunState.CANCELLED, time.time())
            raise
        except TestbenchError as exc:
            await finish_run(store, run_id, owner, RunState.FAILED, time.time(), str(exc))
            raise
        await store.save_results(run_id, results)
        await finish_run(store, run_id, owner, RunState.COMPLETE, time.time())
        if samples:
            results = with_samples(results, await store.samples(run_id))
        return results
    finally:
        if requester is not None:
            await requester.close()
        executor.shutdown(wait=False, cancel_futures=True)
        await conns.close()
