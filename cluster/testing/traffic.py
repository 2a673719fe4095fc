"""Measuring traffic without the loop, for the detection matrix and the benches: a task's
docs read from the project's dataset files, sent to a node as the loop sends them (the
task adapter's own request bodies, one HTTP request per prompt), scored by the adapter,
and kept as :class:`~cluster.honesty.measuring.TrafficDoc` for the traffic check; and the
trusted reference's results on the same docs (:mod:`cluster.honesty.reference_docs`) as a
:class:`~cluster.honesty.measuring.TaskReference`.

The loop does the same with its Sampler, Requester and Evaluator, and keeps what it sent
in MongoDB (``cluster.honesty.measuring.node_traffic`` reads it back); here it stays in
memory, so seeded rounds can be drawn from one pool of answered docs at no cost.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from cluster.core.errors import ErrorCode, EvaluationError, NodeError, TaskError
from cluster.core.paired import ReferenceSet, reference_set_id
from cluster.core.schemas import Node, Relay
from cluster.honesty.measuring import TaskReference, TrafficDoc
from cluster.honesty.reference import TrustedReference
from cluster.honesty.reference_docs import (
    DocWork,
    compute_reference_docs,
    mean_metrics,
    reference_node,
)
from cluster.tasks.registry import load_adapter


def read_rows(datasets_dir: Path, task: str, split: str = "test") -> list[dict[str, Any]]:
    """The task's split as the loop's PostgreSQL holds it: row ``i`` is doc ``i``."""
    path = Path(datasets_dir) / task / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def adapter_for(task: str, datasets_dir: Path, node: Node) -> Any:
    return load_adapter(task, Path(datasets_dir), node)


async def measure_doc(http: aiohttp.ClientSession, node: Node, adapter: Any, doc_id: int,
                      doc: dict[str, Any], *, timeout_s: float = 300.0) -> TrafficDoc:
    """One doc measured on ``node``: its prompts sent, its relays scored."""
    key = f"{node.node_id}|{adapter.name}|{doc_id}|0"
    now = time.time()
    prompts = adapter.build_prompts(node, doc_id, doc, key, now)
    relays: list[Relay] = []
    for prompt in prompts:
        started = time.time()
        response: dict[str, Any] | None = None
        code, error = ErrorCode.OK, None
        try:
            async with http.post(node.base_url + prompt.path, json=prompt.body,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                payload = await resp.json(content_type=None)
                if resp.status != 200 or not isinstance(payload, dict):
                    code, error = ErrorCode.NODE, f"HTTP {resp.status}"
                else:
                    response = payload
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            code, error = ErrorCode.NODE, f"{type(exc).__name__}: {exc}"
        relays.append(Relay(prompt_id=prompt.prompt_id, sample_key=key, node_id=node.node_id,
                            task=adapter.name, doc_id=doc_id,
                            request_index=prompt.request_index, error_code=code, error=error,
                            response=response, latency_s=time.time() - started,
                            started_at=started, finished_at=time.time()))
    metrics: dict[str, float] = {}
    code = ErrorCode.OK
    if any(r.error_code != ErrorCode.OK for r in relays):
        code = ErrorCode.NODE
    else:
        try:
            metrics = adapter.score(doc_id, doc, relays)
        except (EvaluationError, TaskError):
            code = ErrorCode.EVALUATION
        except NodeError:
            code = ErrorCode.NODE
    return TrafficDoc(adapter.name, doc_id, code, metrics, prompts, relays, now)


async def measure_docs(http: aiohttp.ClientSession, node: Node, adapter: Any,
                       docs: Mapping[int, dict[str, Any]], *, concurrency: int = 4
                       ) -> dict[int, TrafficDoc]:
    """Every doc measured on ``node`` (``concurrency`` docs at a time), by doc id."""
    gate = asyncio.Semaphore(concurrency)

    async def one(doc_id: int) -> TrafficDoc:
        async with gate:
            return await measure_doc(http, node, adapter, doc_id, docs[doc_id])

    done = await asyncio.gather(*[one(d) for d in sorted(docs)])
    return {d.doc_id: d for d in done}


async def reference_for_docs(reference: TrustedReference, task: str, datasets_dir: Path,
                             tokenizer_dir: Path, docs: Mapping[int, dict[str, Any]]
                             ) -> tuple[TaskReference, DocWork, float]:
    """The reference's results on ``docs`` as a complete set over those docs (its
    ``full`` scores are their means), the tokens it processed and the seconds it took."""
    adapter = adapter_for(task, datasets_dir, reference_node(reference.model, tokenizer_dir))
    set_id = reference_set_id(reference.model, task, "docs", reference.model)
    work = DocWork()
    started = time.perf_counter()
    results = await compute_reference_docs(reference, adapter, set_id, docs, work)
    seconds = time.perf_counter() - started
    by_doc = {r.doc_id: r for r in results}
    full = {m: sum(r.metrics.get(m, 0.0) for r in results) / len(results)
            for m in adapter.metric_names} if results else {}
    now = time.time()
    found = ReferenceSet(set_id=set_id, model=reference.model, task=task, task_sha256="docs",
                         reference_id=reference.model, output_type=str(adapter.output_type),
                         n_docs=len(docs), docs_done=len(docs), complete=True, full=full,
                         mean_metrics=mean_metrics(adapter), seconds=seconds,
                         tokens=work.tokens, started_at=now, updated_at=now, completed_at=now)
    return TaskReference(found, by_doc), work, seconds


@dataclass(frozen=True)
class TrafficRound:
    """One seeded round of measuring traffic: a draw of docs per task from an answered
    pool, and the salt that picks the relays the reference re-scores."""

    seed: int
    docs: dict[str, list[int]]
    salt: str

    @classmethod
    def draw(cls, seed: int, pools: Mapping[str, Sequence[int]], sizes: Mapping[str, int]
             ) -> TrafficRound:
        rng = random.Random(f"traffic-round|{seed}")
        docs = {task: sorted(rng.sample(list(pool), min(sizes[task], len(pool))))
                for task, pool in pools.items()}
        return cls(seed, docs, f"round-{seed}-{rng.getrandbits(64):016x}")

    def traffic(self, answered: Mapping[str, Mapping[int, TrafficDoc]]) -> list[TrafficDoc]:
        """The round's docs from one node's answered pool (task → doc id → doc)."""
        return [answered[task][d] for task, ids in self.docs.items() for d in ids
                if d in answered.get(task, {})]
