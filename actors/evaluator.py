"""Evaluator: scores relays with lm-eval's filters and process_results, writes samples.

A doc whose relays are not all OK becomes a failed sample with the failing code: it is
never dropped. Samples are keyed by their sample key, so scoring the same relays twice
(a replay after a crash) records nothing new. The (node, task) buffer summary is
recomputed from the samples collection, which keeps it correct under replays too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from actors import metrics
from cluster.core.buffers import summarize_buffer
from cluster.core.errors import ErrorCode, EvaluationError, NodeError
from cluster.core.schemas import Node, Relay, Sample, ScoreSamples, failure_code
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections
from cluster.tasks.lmeval import TaskAdapter
from cluster.tasks.registry import load_adapter

log = logging.getLogger(__name__)

def epoch_of(key: str) -> int:
    return int(key.rsplit("|", 1)[1])


class Evaluator:
    def __init__(
        self,
        settings: Settings,
        stores: StoreConnections | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._stores = stores or StoreConnections(settings)
        self._clock = clock

    def adapter(self, node: Node, task: str) -> TaskAdapter:
        return load_adapter(task, self._settings.datasets_dir, node)

    def score_doc(
        self, adapter: TaskAdapter, doc_id: int, doc: dict, relays: list[Relay], now: float
    ) -> Sample:
        first = relays[0]
        latencies = [r.latency_s for r in relays if r.latency_s is not None]
        base = {
            "sample_key": first.sample_key,
            "node_id": first.node_id,
            "task": first.task,
            "doc_id": doc_id,
            "epoch": epoch_of(first.sample_key),
            "latency_s": max(latencies) if latencies else None,
            "created_at": now,
        }
        code = failure_code(relays)
        if code is not None:
            errors = "; ".join(
                f"#{r.request_index}: {r.error}" for r in relays if r.error_code != ErrorCode.OK
            )
            return Sample(error_code=code, error=errors[:2000], **base)
        ordered = sorted(relays, key=lambda r: r.request_index)
        evidence: dict[str, str] = {}
        try:
            metrics = adapter.score(doc_id, doc, ordered)
            if hasattr(adapter, "evidence"):
                evidence = adapter.evidence(doc_id, doc, ordered)
        except EvaluationError as exc:
            return Sample(error_code=ErrorCode.EVALUATION, error=str(exc)[:2000], **base)
        except NodeError as exc:  # e.g. an image that does not decode: the node's answer is bad
            return Sample(error_code=ErrorCode.NODE, error=str(exc)[:2000], **base)
        return Sample(error_code=ErrorCode.OK, metrics=metrics, evidence=evidence, **base)

    async def score(self, relays: list[Relay], node: Node) -> ScoreSamples:
        if not relays:
            return ScoreSamples(node_id=node.node_id, task="", samples=[])
        task = relays[0].task
        adapter = self.adapter(node, task)
        groups: dict[str, list[Relay]] = {}
        for relay in relays:
            groups.setdefault(relay.sample_key, []).append(relay)
        doc_ids = sorted({r.doc_id for r in relays})
        datasets = await self._stores.datasets()
        docs = await datasets.fetch_docs(task, adapter.eval_split, doc_ids)
        now = self._clock()
        samples = [
            self.score_doc(adapter, group[0].doc_id, docs[group[0].doc_id], group, now)
            for group in groups.values()
        ]
        mongo = await self._stores.mongo()
        new = await mongo.samples.record_samples(samples)
        metrics.record_samples(new)  # only new ones: a replayed batch is not counted twice
        await mongo.prompts.mark_done(list(groups))
        await self.refresh_buffer(node.node_id, task, adapter)
        log.info(
            "evaluator.scored node=%s task=%s samples=%d new=%d failed=%d",
            node.node_id, task, len(samples), len(new),
            sum(1 for s in samples if s.error_code != ErrorCode.OK),
        )
        return ScoreSamples(node_id=node.node_id, task=task, samples=samples)

    async def refresh_buffer(self, node_id: str, task: str, adapter: TaskAdapter) -> None:
        now = self._clock()
        mongo = await self._stores.mongo()
        recent = await mongo.samples.latest(
            node_id, task, since_ts=now - self._settings.manager.sample_ttl_s,
            limit=self._settings.manager.task_targets.get(
                task, self._settings.manager.target_samples
            ),
        )
        summary = summarize_buffer(
            node_id, task, recent, adapter.metric_names, now, aggregate=adapter.aggregate
        )
        entries = [
            {k: row.get(k) for k in ("doc_id", "error_code", "metrics", "latency_s", "created_at")}
            | {"sample_key": row["_id"]}
            for row in reversed(recent)
        ]
        await mongo.buffers.set_summary(summary.model_dump(), entries)
