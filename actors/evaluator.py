"""Evaluator: scores relays with lm-eval's filters and process_results, writes samples.

A doc whose relays are not all OK becomes a failed sample with the failing code: it is
never dropped. Samples are keyed by their sample key, so scoring the same relays twice
(a replay after a crash) records nothing new. Each (node, task) buffer summary is
recomputed from the samples collection, which keeps it correct under replays too.

One call scores the docs of many pairs: one MongoDB write for the samples, one for the
prompts' ``_done`` marks, one read and one bulk write for the buffers. The docs come from
the Sampler with the prompts; only a re-driven batch (after a crash) reads them from
PostgreSQL again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from actors import metrics
from cluster.core.buffers import summarize_buffer
from cluster.core.errors import ErrorCode, EvaluationError, NodeError, TaskError
from cluster.core.schemas import Node, Relay, Sample, failure_code
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections
from cluster.tasks.registry import catalog_of, load_adapter, warm_adapters

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


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

    def adapter(self, node: Node, task: str) -> Any:
        return load_adapter(task, catalog_of(self._settings), node)

    def warm_up(self, pairs: Sequence[tuple[Node, str]]) -> int:
        return warm_adapters(pairs, catalog_of(self._settings))

    def score_doc(
        self, adapter: Any, doc_id: int, doc: dict, relays: list[Relay], now: float
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
            return Sample(error_code=code, error=errors[:MAX_ERROR_CHARS], **base)
        ordered = sorted(relays, key=lambda r: r.request_index)
        evidence: dict[str, str] = {}
        try:
            scores = adapter.score(doc_id, doc, ordered)
            if hasattr(adapter, "evidence"):
                evidence = adapter.evidence(doc_id, doc, ordered)
        except EvaluationError as exc:
            return Sample(error_code=ErrorCode.EVALUATION, error=str(exc)[:MAX_ERROR_CHARS], **base)
        except NodeError as exc:  # e.g. an image that does not decode: the node's answer is bad
            return Sample(error_code=ErrorCode.NODE, error=str(exc)[:MAX_ERROR_CHARS], **base)
        return Sample(error_code=ErrorCode.OK, metrics=scores, evidence=evidence, **base)

    async def score(
        self,
        relays: Sequence[Relay],
        nodes: Mapping[str, Node] | Node,
        docs: Mapping[tuple[str, int], dict[str, Any]] | None = None,
    ) -> list[Sample]:
        """Score every doc the relays complete (relays grouped by sample key), record the
        samples and refresh the buffers they land in; returns the samples (replays
        included, so the caller learns the outcome of every doc it sent).

        ``docs`` are the Sampler's (task, doc_id) → doc; missing ones are read from
        PostgreSQL. A doc whose task cannot be scored as configured gets a ``BAD_PARAMS``
        sample (the bench's side, not counted against the node)."""
        if isinstance(nodes, Node):
            nodes = {nodes.node_id: nodes}
        if not relays:
            return []
        groups: dict[str, list[Relay]] = {}
        for relay in relays:
            groups.setdefault(relay.sample_key, []).append(relay)
        adapters: dict[tuple[str, str], Any] = {}
        problems: dict[tuple[str, str], str] = {}
        for group in groups.values():
            pair = (group[0].node_id, group[0].task)
            if pair in adapters or pair in problems:
                continue
            node = nodes.get(pair[0])
            try:
                if node is None:
                    raise TaskError(f"node {pair[0]!r} is not among the nodes to score for")
                adapters[pair] = self.adapter(node, pair[1])
            except TaskError as exc:
                problems[pair] = str(exc)
        docs = dict(docs or {})
        await self._read_missing_docs(groups, adapters, docs)
        now = self._clock()
        samples: list[Sample] = []
        for group in groups.values():
            first = group[0]
            pair = (first.node_id, first.task)
            adapter = adapters.get(pair)
            doc = docs.get((first.task, first.doc_id))
            if adapter is None or doc is None:
                why = problems.get(pair) or f"doc {first.doc_id} of {first.task} was not found"
                samples.append(self._bench_failure(first, why, now))
                continue
            samples.append(self.score_doc(adapter, first.doc_id, doc, group, now))
        mongo = await self._stores.mongo()
        new = await mongo.samples.record_samples(samples)
        metrics.record_samples(new)  # only new ones: a replayed batch is not counted twice
        await mongo.prompts.mark_done([r.prompt_id for r in relays])
        await self.refresh_buffers({pair: a for pair, a in adapters.items()})
        log.debug("evaluator.scored samples=%d new=%d failed=%d", len(samples), len(new),
                  sum(1 for s in samples if s.error_code != ErrorCode.OK))
        return samples

    async def _read_missing_docs(
        self, groups: Mapping[str, list[Relay]], adapters: Mapping[tuple[str, str], Any],
        docs: dict[tuple[str, int], dict[str, Any]],
    ) -> None:
        missing: dict[tuple[str, str], set[int]] = {}
        for group in groups.values():
            first = group[0]
            adapter = adapters.get((first.node_id, first.task))
            if adapter is not None and (first.task, first.doc_id) not in docs:
                missing.setdefault((first.task, adapter.eval_split), set()).add(first.doc_id)
        if not missing:
            return
        datasets = await self._stores.datasets()
        for (task, split), ids in missing.items():
            for doc_id, doc in (await datasets.fetch_docs(task, split, sorted(ids))).items():
                docs[(task, doc_id)] = doc

    def _bench_failure(self, first: Relay, why: str, now: float) -> Sample:
        return Sample(sample_key=first.sample_key, node_id=first.node_id, task=first.task,
                      doc_id=first.doc_id, epoch=epoch_of(first.sample_key),
                      error_code=ErrorCode.BAD_PARAMS, error=why[:MAX_ERROR_CHARS],
                      created_at=now)

    async def refresh_buffers(self, adapters: Mapping[tuple[str, str], Any]) -> None:
        """Recompute the buffers of these (node, task) pairs from their samples."""
        if not adapters:
            return
        now = self._clock()
        cfg = self._settings.manager
        limits = {pair: cfg.task_targets.get(pair[1], cfg.target_samples) for pair in adapters}
        mongo = await self._stores.mongo()
        recent = await mongo.samples.latest_for_pairs(limits, since_ts=now - cfg.sample_ttl_s)
        updates = []
        for (node_id, task), adapter in adapters.items():
            rows = recent.get((node_id, task), [])
            summary = summarize_buffer(node_id, task, rows, adapter.metric_names, now,
                                       aggregate=adapter.aggregate)
            entries = [
                {k: row.get(k) for k in ("doc_id", "error_code", "metrics", "latency_s",
                                          "created_at")} | {"sample_key": row["_id"]}
                for row in reversed(rows)
            ]
            updates.append((summary.model_dump(), entries))
        await mongo.buffers.set_summaries(updates)
