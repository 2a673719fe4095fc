"""One doc of an evaluation run: its prompts, and its score with lm-eval's per-sample record.

Prompts come from the measuring loop's :class:`~cluster.tasks.lmeval.TaskAdapter`; a run's
``gen_kwargs`` are merged into each generation request's arguments exactly as lm-eval's
``simple_evaluate(gen_kwargs=...)`` merges them into the task's ``generation_kwargs``.

Scoring follows the Evaluator (a doc whose relays are not all OK fails with the node's
code; an unparseable answer fails with EVALUATION) and ``TaskAdapter.score``, keeping the
answered Instances so the doc's record has lm-eval's own ``samples`` shape (arguments,
resps, filtered_resps, hashes, metrics per filter).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cluster.core.errors import ErrorCode, EvaluationError, TaskError
from cluster.core.evaluations import EvalSample
from cluster.core.schemas import Node, Prompt, Relay, failure_code, sample_key
from cluster.tasks.lmeval import TaskAdapter

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

MAX_ERROR_CHARS = 2000


def doc_sample_key(node: Node, task: str, doc_id: int) -> str:
    """Epoch 0: a run measures each doc once, so its relay ids depend on run, doc, index."""
    return sample_key(node.node_id, task, doc_id, 0)


def build_doc_prompts(
    adapter: TaskAdapter,
    node: Node,
    doc_id: int,
    doc: dict[str, Any],
    now: float,
    gen_kwargs: Mapping[str, Any] | None = None,
) -> list[Prompt]:
    """The HTTP requests of one doc, as the loop makes them, with the run's ``gen_kwargs``."""
    return adapter.build_prompts(node, doc_id, doc, doc_sample_key(node, adapter.name, doc_id),
                                 now, gen_kwargs=gen_kwargs)


def _json_safe(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable, ensure_ascii=False))


def lmeval_records(
    adapter: TaskAdapter, doc_id: int, instances: list[Instance], metrics: dict[str, float]
) -> list[dict[str, Any]]:
    """lm-eval's ``samples`` entries of one doc, one per filter (``evaluator.evaluate``)."""
    from lm_eval.utils import handle_non_serializable, hash_string

    requests = sorted(instances, key=lambda x: x.idx)
    doc = requests[0].doc
    target = adapter.task.doc_to_target(doc)
    doc_hash = hash_string(
        json.dumps(doc, indent=2, default=handle_non_serializable, ensure_ascii=False)
    )
    records = []
    for filter_key in requests[0].filtered_resps:
        values = {
            name.split(",", 1)[0]: value
            for name, value in metrics.items()
            if name.split(",", 1)[1] == filter_key
        }
        record: dict[str, Any] = {
            "doc_id": doc_id,
            "doc": doc,
            "target": target,
            "arguments": [req.args for req in requests],
            "resps": [req.resps for req in requests],
            "filtered_resps": [req.filtered_resps[filter_key] for req in requests],
            "filter": filter_key,
            "metrics": list(values),
            "doc_hash": doc_hash,
            "prompt_hash": hash_string(requests[0].arguments[0]),
            "target_hash": hash_string(str(target)),
        }
        record.update(values)
        records.append(_json_safe(record))
    return records


def score_doc(
    adapter: TaskAdapter,
    run_id: str,
    doc_id: int,
    doc: dict[str, Any],
    relays: list[Relay],
    now: float,
    gen_kwargs: Mapping[str, Any] | None = None,
) -> EvalSample:
    """The doc's sample: lm-eval's metrics and records, or a failure with its code."""
    latencies = [r.latency_s for r in relays if r.latency_s is not None]
    base: dict[str, Any] = {
        "run_id": run_id, "task": adapter.name, "doc_id": doc_id, "created_at": now,
        "latency_s": max(latencies) if latencies else None,
    }
    code = failure_code(relays)
    if code is not None:
        errors = "; ".join(
            f"#{r.request_index}: {r.error}" for r in relays if r.error_code != ErrorCode.OK
        )
        return EvalSample(error_code=code, error=errors[:MAX_ERROR_CHARS], **base)
    try:
        ordered = sorted(relays, key=lambda r: r.request_index)
        instances = adapter.answered_instances(doc_id, doc, ordered, gen_kwargs)
        metrics = adapter.score_instances(instances)
        records = lmeval_records(adapter, doc_id, instances, metrics)
    except EvaluationError as exc:
        return EvalSample(error_code=ErrorCode.EVALUATION, error=str(exc)[:MAX_ERROR_CHARS], **base)
    except TaskError as exc:  # relays that do not fit the doc: ours, not the node's fault
        return EvalSample(error_code=ErrorCode.RELAY, error=str(exc)[:MAX_ERROR_CHARS], **base)
    return EvalSample(error_code=ErrorCode.OK, metrics=metrics, records=records, **base)
