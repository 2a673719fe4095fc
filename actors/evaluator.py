"""Evaluator: scores relays with lm-eval's filters and process_results, writes samples.

A doc whose relays are not all OK becomes a failed sample with the failing code: it is
never dropped. Samples are keyed by their sample key, so scoring the same relays twice
(a replay after a crash) records nothing new. Each (node, task) buffer holds the pair's
newest samples as the samples collection has them, which keeps it correct under replays
too (only newly recorded samples are merged; a buffer someone else wrote is re-read).

One call scores the docs of many pairs: one MongoDB write for the samples, one for the
prompts' ``_done`` marks, one small read (the buffers' revisions) and one bulk write for
the buffers: a buffer this process wrote last gets the new samples merged into the rows it
holds, any other is recomputed from the samples. The docs come from the Sampler with the
prompts and their built requests (nothing is rendered or tokenized twice); only a
re-driven batch (after a crash) reads them from PostgreSQL and builds them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from actors import metrics
from actors.sampler import DrawnDocs
from cluster.core.buffers import newest_rows, summarize_buffer
from cluster.core.errors import ErrorCode, EvaluationError, NodeError, TaskError
from cluster.core.schemas import Node, Relay, Sample, failure_code
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections
from cluster.storage.mongo.buffers import encode_entry
from cluster.tasks.registry import catalog_of, load_adapter, warm_adapters

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


# Buffer rows this process keeps (the rows it wrote last, per pair) at most: beyond, the
# pairs refreshed longest ago are forgotten and re-read from the samples when next scored.
HELD_ROWS_MAX = 200_000
# a buffer row: a sample document's fields that its buffer entry and summary use
_ROW_FIELDS = ("_id", "doc_id", "error_code", "metrics", "latency_s", "created_at")


def epoch_of(key: str) -> int:
    return int(key.rsplit("|", 1)[1])


@dataclass(slots=True)
class _HeldBuffer:
    """The rows (newest first) of a buffer as this process wrote it, at that revision."""

    revision: str
    rows: list[dict[str, Any]]


def _row_of(sample: Sample) -> dict[str, Any]:
    return {"_id": sample.sample_key, "doc_id": sample.doc_id,
            "error_code": int(sample.error_code), "metrics": dict(sample.metrics),
            "latency_s": sample.latency_s, "created_at": sample.created_at}


def _entry_of(row: dict[str, Any]) -> str:
    """The row's buffer entry, encoded once per row (a row stays in its buffer for a
    whole fill, and the buffer is written after every batch)."""
    encoded = row.get("_entry")
    if encoded is None:
        encoded = row["_entry"] = encode_entry(
            {k: row[k] for k in _ROW_FIELDS[1:]} | {"sample_key": row["_id"]})
    return encoded


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
        self._rows: OrderedDict[tuple[str, str], _HeldBuffer] = OrderedDict()
        self._held_rows = 0
        self._refresh_lock = asyncio.Lock()

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
        docs: DrawnDocs | Mapping[tuple[str, int], dict[str, Any]] | None = None,
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
        handed: Mapping[tuple[str, str, int], Any] = {}
        if isinstance(docs, DrawnDocs):
            docs, handed = docs.docs, docs.requests
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
            requests = handed.get((first.node_id, first.task, first.doc_id))
            if requests is not None:  # built by the Sampler: not rendered and tokenized again
                adapter.adopt_doc_requests(requests)
            samples.append(self.score_doc(adapter, first.doc_id, doc, group, now))
        mongo = await self._stores.mongo()
        new = await mongo.samples.record_samples(samples)
        metrics.record_samples(new)  # only new ones: a replayed batch is not counted twice
        await mongo.prompts.mark_done([r.prompt_id for r in relays])
        await self.refresh_buffers(adapters, new)
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

    async def refresh_buffers(
        self, adapters: Mapping[tuple[str, str], Any], new: Sequence[Sample] = ()
    ) -> None:
        """Bring the buffers of these (node, task) pairs up to date with their samples.

        A pair whose buffer this process wrote last (same revision) gets ``new`` (the
        samples just recorded) merged into the rows it wrote, and is written only if nobody
        wrote it meanwhile; any other pair is recomputed from the samples collection. Every
        scored batch refreshes its pairs, so re-reading a pair's whole buffer of samples
        each time cost O(buffer) per batch (quadratic over a fill)."""
        if not adapters:
            return
        pairs = list(adapters)
        # one refresh at a time in this process: concurrent scoring calls refreshing the
        # same pair would otherwise race on the rows held for it
        async with self._refresh_lock:
            try:
                if not await self._refresh(adapters, new, trust_cache=True):
                    # someone else wrote one of these buffers meanwhile: recompute them all
                    for pair in pairs:
                        self._rows.pop(pair, None)
                    await self._refresh(adapters, (), trust_cache=False)
            except BaseException:
                for pair in pairs:  # what this process holds may no longer be what is stored
                    self._rows.pop(pair, None)
                raise

    async def _refresh(
        self, adapters: Mapping[tuple[str, str], Any], new: Sequence[Sample], trust_cache: bool
    ) -> bool:
        now = self._clock()
        cfg = self._settings.manager
        since = now - cfg.sample_ttl_s
        limits = {pair: cfg.task_targets.get(pair[1], cfg.target_samples) for pair in adapters}
        mongo = await self._stores.mongo()
        held: dict[tuple[str, str], _HeldBuffer] = {}
        if trust_cache:
            mine = [pair for pair in adapters if pair in self._rows]
            stored = await mongo.buffers.revisions(mine)
            held = {pair: self._rows[pair] for pair in mine
                    if stored[pair] == self._rows[pair].revision}
        stale = {pair: limit for pair, limit in limits.items() if pair not in held}
        recent = await mongo.samples.latest_for_pairs(stale, since_ts=since) if stale else {}
        fresh: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for sample in new:
            if sample.error_code.counts_against_node:
                fresh.setdefault((sample.node_id, sample.task), []).append(_row_of(sample))
        updates = []
        rows_of: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for (node_id, task), adapter in adapters.items():
            pair = (node_id, task)
            if pair in held:
                rows = newest_rows([*fresh.get(pair, []), *held[pair].rows], since, limits[pair])
            else:
                rows = [{k: row.get(k) for k in _ROW_FIELDS} for row in recent.get(pair, [])]
            rows_of[pair] = rows
            summary = summarize_buffer(node_id, task, rows, adapter.metric_names, now,
                                       aggregate=adapter.aggregate)
            updates.append((summary.model_dump(), [_entry_of(row) for row in reversed(rows)]))
        revisions = await mongo.buffers.set_summaries(
            updates, expected={pair: b.revision for pair, b in held.items()})
        if revisions is None:
            return False
        for pair, rows in rows_of.items():
            self._rows[pair] = _HeldBuffer(revisions[pair], rows)
            self._rows.move_to_end(pair)
        self._held_rows = sum(len(b.rows) for b in self._rows.values())
        while self._rows and self._held_rows > HELD_ROWS_MAX:
            _, dropped = self._rows.popitem(last=False)
            self._held_rows -= len(dropped.rows)
        return True
