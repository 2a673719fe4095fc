"""Evaluation as a service, the core: lm-eval runs as resumable full passes.

- :class:`EvaluationSpec`, :class:`EvaluationRun`, :class:`RunState`: what a run is
  (records in :mod:`cluster.core.evaluations`);
- :class:`EvaluationStore`: runs, relays, scored docs, logs and results in MongoDB
  (:mod:`cluster.storage.mongo.evaluations`, also ``MongoStores.evaluations``);
- :class:`EvaluationRunner`: executes one run with the measuring loop's parts;
- :mod:`cluster.evaluations.tasks`: what a run measures (lm-eval tasks, groups and tags,
  tenants' custom task folders) and where its docs live in PostgreSQL;
- :class:`EvaluationWorker`: claims, leases, cancels and suspends runs in one process;
- :mod:`cluster.evaluations.progress`: a run's percent, count and ETA as requests complete;
- :mod:`cluster.evaluations.endpoints`: the endpoint policy per tenant;
- :mod:`cluster.cli.evaluations`: ``testbench eval``.

The REST API and the leaderboard page are the Serve app ``serve_apps.evaluations``.
"""

from cluster.core.evaluations import (
    EvalSample,
    EvaluationRun,
    EvaluationSpec,
    LogLine,
    RunState,
    TaskProgress,
)
from cluster.evaluations.runner import EvaluationRunner, LeaseLostError, RunFailedError
from cluster.evaluations.runs import (
    SpecError,
    check_spec,
    new_run,
    request_cancel,
    request_resume,
    request_suspend,
)
from cluster.evaluations.worker import EvaluationWorker
from cluster.storage.mongo import EvaluationStore

__all__ = [
    "EvalSample",
    "EvaluationRun",
    "EvaluationRunner",
    "EvaluationSpec",
    "EvaluationStore",
    "EvaluationWorker",
    "LeaseLostError",
    "LogLine",
    "RunFailedError",
    "RunState",
    "SpecError",
    "TaskProgress",
    "check_spec",
    "new_run",
    "request_cancel",
    "request_resume",
    "request_suspend",
]
