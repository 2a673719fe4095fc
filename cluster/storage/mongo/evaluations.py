"""``evaluations`` and its satellites: evaluation runs, their relays, scored docs, log
lines and results.

- ``evaluations``: one document per run. Query fields (tenant, state, times, lease) are
  top-level; the whole record is kept as canonical ASCII JSON in ``record``, so any string a
  user sent survives BSON and nx-27017's sub-document quirks. Writes replace the whole
  document under a revision check (compare-and-swap): nx-27017 mangles ``$set`` of bools
  and ``$push`` of sub-documents, and a replace keeps concurrent writers honest.
- ``evaluation_relays``: the
  measuring loop's :class:`~cluster.storage.mongo.relays.RelayStore`, first-wins by prompt
  id. Kept apart from the loop's ``prompts``/``relays`` so the Manager never re-drives a
  run's work.
- ``evaluation_samples``: one document per (run, task, doc), first-wins.
- ``evaluation_logs``: log lines, ``_id`` = ``<run>|<key>`` with time-ordered keys.
- ``evaluation_results``: the lm-eval results JSON of a complete run.
"""

from __future__ import annotations

import builtins
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from pymongo import ASCENDING, DESCENDING

from cluster.core.errors import ErrorCode, TestbenchError
from cluster.core.evaluations import EvalSample, EvaluationRun, LogLine, RunState
from cluster.storage.mongo.base import (
    EVALUATION_LOGS,
    EVALUATION_RELAYS,
    EVALUATION_RESULTS,
    EVALUATION_SAMPLES,
    EVALUATIONS,
    HasDatabase,
    insert_new,
)
from cluster.storage.mongo.relays import RelayStore

log = logging.getLogger(__name__)

# Bounded retries of a compare-and-swap: writers of one run are its owner and the API.
_CAS_ATTEMPTS = 20
# Above any log key (keys are digits and hex): the end of one run's key range.
_KEY_END = "~"


class RunConflictError(TestbenchError):
    """A run kept changing under a write (far more writers than expected)."""


def _dumps(value: Any) -> str:
    # ASCII only: lone surrogates or odd code points from users cannot break BSON.
    return json.dumps(value, ensure_ascii=True, sort_keys=True, separators=(",", ":"))


def _run_document(run: EvaluationRun) -> dict[str, Any]:
    return {
        "_id": run.run_id,
        "tenant": run.tenant,
        "state": run.state.value,
        "created_at": run.created_at,
        "lease_until": run.lease_until,
        "rev": run.rev,
        "record": _dumps(run.model_dump(mode="json")),
    }


def _run_from_document(doc: dict[str, Any]) -> EvaluationRun:
    return EvaluationRun.model_validate(json.loads(doc["record"]))


class EvaluationStore:
    """The evaluation collections of the bench's database.

    ``mongo`` is the :class:`~cluster.storage.mongo.stores.MongoStores` the store lives on
    (``MongoStores.evaluations`` is one on its clock); ``clock`` stamps writes and log lines.
    """

    def __init__(self, mongo: HasDatabase, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        db = mongo.database
        self._runs = db[EVALUATIONS]
        self._samples = db[EVALUATION_SAMPLES]
        self._logs = db[EVALUATION_LOGS]
        self._results = db[EVALUATION_RESULTS]
        self.relays = RelayStore(db[EVALUATION_RELAYS])

    async def ensure_indexes(self) -> None:
        await self._runs.create_index([("tenant", ASCENDING), ("created_at", DESCENDING)])
        await self._runs.create_index([("state", ASCENDING), ("created_at", ASCENDING)])
        await self._samples.create_index([("run_id", ASCENDING), ("task", ASCENDING)])

    # ------------------------------------------------------------------ runs
    async def create(self, run: EvaluationRun) -> None:
        await self._runs.insert_one(_run_document(run))

    async def get(self, run_id: str) -> EvaluationRun | None:
        doc = await self._runs.find_one({"_id": run_id})
        return _run_from_document(doc) if doc is not None else None

    async def list(
        self, tenant: str, *, state: RunState | None, offset: int, limit: int
    ) -> tuple[builtins.list[EvaluationRun], int]:
        """A tenant's runs, newest first, and how many there are in all."""
        query: dict[str, Any] = {"tenant": tenant}
        if state is not None:
            query["state"] = {"$in": state.stored_names}  # runs stored under older names too
        total = await self._runs.count_documents(query)
        docs = await (
            self._runs.find(query)
            .sort([("created_at", DESCENDING), ("_id", DESCENDING)])
            .skip(offset)
            .limit(limit)
            .to_list()
        )
        return [_run_from_document(d) for d in docs], total

    async def mutate(
        self, run_id: str, change: Callable[[EvaluationRun], bool]
    ) -> EvaluationRun | None:
        """Apply ``change`` (which edits the run and says whether to write) atomically.

        The run is re-read and ``change`` re-applied whenever another writer got there
        first. Returns the run as stored afterwards, or None when there is no such run.
        """
        for _ in range(_CAS_ATTEMPTS):
            doc = await self._runs.find_one({"_id": run_id})
            if doc is None:
                return None
            run = _run_from_document(doc)
            rev = run.rev
            if not change(run):
                return run
            run.rev = rev + 1
            run.updated_at = float(self._clock())
            result = await self._runs.replace_one({"_id": run_id, "rev": rev}, _run_document(run))
            if result.matched_count == 1:
                return run
        raise RunConflictError(f"run {run_id} kept changing; gave up after {_CAS_ATTEMPTS} tries")

    async def claimable(self, now: float, limit: int) -> builtins.list[EvaluationRun]:
        """New runs and scheduled or running ones whose owner's lease ran out, oldest first."""
        states = [name for state in (RunState.NEW, RunState.SCHEDULED, RunState.RUNNING)
                  for name in state.stored_names]
        docs = await (
            self._runs.find({
                "state": {"$in": states},
                "lease_until": {"$lt": float(now)},
            })
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            .limit(limit)
            .to_list()
        )
        return [_run_from_document(d) for d in docs]

    # ------------------------------------------------------------------ samples
    async def record_samples(self, samples: builtins.list[EvalSample]) -> int:
        """Insert samples whose (run, task, doc) is new; returns how many were."""
        docs = [
            {
                "_id": s.key,
                "run_id": s.run_id,
                "task": s.task,
                "doc_id": s.doc_id,
                "error_code": int(s.error_code),
                "created_at": s.created_at,
                "record": _dumps(s.model_dump(mode="json")),
            }
            for s in samples
        ]
        return len(await insert_new(self._samples, docs))

    async def samples(self, run_id: str, task: str | None = None) -> builtins.list[EvalSample]:
        """The run's scored docs, by task then doc id."""
        query: dict[str, Any] = {"run_id": run_id}
        if task is not None:
            query["task"] = task
        docs = await self._samples.find(query).to_list()
        out = [EvalSample.model_validate(json.loads(d["record"])) for d in docs]
        return sorted(out, key=lambda s: (s.task, s.doc_id))

    async def scored_docs(self, run_id: str, task: str) -> dict[int, ErrorCode]:
        """doc id → error code of the docs of ``task`` already scored in this run."""
        docs = await self._samples.find(
            {"run_id": run_id, "task": task}, {"doc_id": 1, "error_code": 1}
        ).to_list()
        return {int(d["doc_id"]): ErrorCode(int(d["error_code"])) for d in docs}

    # ------------------------------------------------------------------ logs
    async def append_log(self, run_id: str, message: str, *, level: str = "info") -> LogLine:
        now = float(self._clock())
        # Time first so keys sort by time; random bits so two writers never collide.
        key = f"{int(now * 1e6):017d}-{secrets.token_hex(3)}"
        line = LogLine(key=key, run_id=run_id, ts=now, level=level, message=message)
        await self._logs.insert_one({
            "_id": f"{run_id}|{key}",
            "run_id": run_id,
            "record": _dumps(line.model_dump(mode="json")),
        })
        return line

    async def logs_after(
        self, run_id: str, after: str | None = None, limit: int = 1000
    ) -> builtins.list[LogLine]:
        """The run's log lines after key ``after`` (all when None), oldest first."""
        low = f"{run_id}|{after}" if after else f"{run_id}|"
        docs = await (
            self._logs.find({"_id": {"$gt": low, "$lt": f"{run_id}|{_KEY_END}"}})
            .sort("_id", ASCENDING)
            .limit(limit)
            .to_list()
        )
        return [LogLine.model_validate(json.loads(d["record"])) for d in docs]

    # ------------------------------------------------------------------ results
    async def save_results(self, run_id: str, results: dict[str, Any]) -> None:
        doc = {"_id": run_id, "record": _dumps(results)}
        await self._results.replace_one({"_id": run_id}, doc, upsert=True)

    async def results(self, run_id: str) -> dict[str, Any] | None:
        doc = await self._results.find_one({"_id": run_id})
        return json.loads(doc["record"]) if doc is not None else None
