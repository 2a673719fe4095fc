"""Paired scores in an evaluation's results JSON: for each task of the run whose trusted
reference results are complete (``reference_sets``, kept by the measuring loop for the
models in ``honesty.references``), the reference's full-task score + the run's mean
per-doc difference from it, with that difference's stderr, under ``testbench.paired`` (lm-eval's
own sections are left as lm-eval writes them)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from cluster.core.evaluations import EvalSample, EvaluationRun
from cluster.core.paired import DEFAULT_PROMPTING, paired_scores
from cluster.storage.mongo import MongoStores

log = logging.getLogger(__name__)


def pairs_with_reference(run: EvaluationRun) -> bool:
    """The run sends what the reference answered: completions, the task's own few-shot
    setting, no chat template or system instruction."""
    spec = run.spec
    return (spec.api == "completions" and spec.num_fewshot is None
            and not spec.apply_chat_template and spec.system_instruction is None)


async def paired_section(mongo: MongoStores, run: EvaluationRun,
                         samples: Sequence[EvalSample]) -> dict[str, Any]:
    """task → metric → the paired estimate (empty when nothing pairs)."""
    if not pairs_with_reference(run):
        return {}
    tasks = sorted({s.task for s in samples})
    sets = await mongo.reference_sets.usable([(run.spec.model, t) for t in tasks],
                                             DEFAULT_PROMPTING)
    out: dict[str, Any] = {}
    for (_, task), found in sorted(sets.items()):
        mine = [s for s in samples if s.task == task]
        docs = await mongo.reference_docs.for_set(found.set_id, [s.doc_id for s in mine])
        rows = [{"doc_id": s.doc_id, "error_code": int(s.error_code), "metrics": s.metrics,
                 "created_at": s.created_at} for s in mine]
        scores = paired_scores(rows, found, docs)
        if scores:
            out[task] = {"reference_set": found.set_id, "reference_docs": found.n_docs,
                         **{m: score.model_dump() for m, score in scores.items()}}
    return out


async def with_paired(results: dict[str, Any], mongo: MongoStores, run: EvaluationRun,
                      samples: Sequence[EvalSample]) -> dict[str, Any]:
    """``results`` with ``testbench.paired`` when any task pairs with the reference (a
    failure to read the reference's results leaves lm-eval's results as they are)."""
    try:
        section = await paired_section(mongo, run, samples)
    except Exception:  # the run's own results must not be lost to a side section
        log.warning("evaluations.paired_unavailable run=%s", run.run_id, exc_info=True)
        return results
    if section:
        results.setdefault("testbench", {})["paired"] = section
    return results
