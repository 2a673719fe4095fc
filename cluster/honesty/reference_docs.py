"""The trusted reference's per-doc results of a task, computed once per (claimed model,
task) and kept in MongoDB (``reference_sets``, ``reference_docs``): what paired scores
(``cluster/core/paired.py``) and the traffic check (``cluster/honesty/measuring.py``)
compare nodes with.

A doc's result is computed through the task's own adapter (``cluster/tasks``) for the
reference as a node: the claimed model over ``/v1/completions`` with lm-eval's default
prompting and the reference's tokenizer, so its requests are token for token the ones the
loop sends a node with those settings.

- **loglikelihood** requests (multiple choice): the token ids lm-eval sends
  (:meth:`TaskAdapter.loglikelihood_tokens`) teacher-forced by the reference directly
  (:meth:`TrustedReference.logprobs`: no HTTP for a model in process), the sum over the
  continuation and whether every continuation token is the greedy one, as lm-eval's
  ``parse_logprobs`` reads them from a node's echo; then lm-eval's filters and
  ``process_results`` (:meth:`TaskAdapter.score_instances`).
- **generation** requests: the reference's greedy answer to the request's prompt, cut at
  the request's stop strings, scored the same way; the signature task keeps its answers.

Work is done in steps of at most ``honesty.reference_docs_chunk`` docs (the Auditor runs
them, ``actors/auditor.py``), so a long task never holds the Auditor for long. A set is
keyed by the task's content (the dataset's sha256 in ``task_registry`` and the task's
config) and the reference's identity (:func:`reference_identity`): when either changes a
new set starts, the older ones of the pair are marked stale at once (never paired with)
and deleted when the new one completes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.core.errors import TaskError, TestbenchError
from cluster.core.paired import (
    DEFAULT_PROMPTING,
    ReferenceDoc,
    ReferenceGeneration,
    ReferenceRequest,
    ReferenceSet,
    reference_set_id,
)
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.honesty.reference import (
    ReferenceAnswer,
    ServeReference,
    TransformersReference,
    TrustedReference,
)
from cluster.storage.mongo import MongoStores
from cluster.storage.postgres import DatasetStore
from cluster.tasks.registry import catalog_of, leaf_task_names, load_adapter, task_kind
from cluster.wire import openai as wire

log = logging.getLogger(__name__)

REFERENCE_NODE_ID = "reference"
LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice")
# docs whose requests go to the reference in one call (its batch: left-padded sequences)
BATCH_DOCS = 8


def reference_node(model: str, tokenizer_dir: Path | str) -> Node:
    """The reference as the adapters see a node: completions, default prompting."""
    return Node(node_id=REFERENCE_NODE_ID, url="http://reference.invalid", model=model,
                tokenizer=str(tokenizer_dir))


@functools.cache
def _weights_sha256(model_dir: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        with open(Path(model_dir) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


async def reference_identity(reference: TrustedReference) -> str:
    """What the reference's results depend on: for a model in process, its engine and the
    sha256 of its config, tokenizer and weight files; for a Serve app, its URL, the model it
    serves and its config signature."""
    from cluster.honesty.reference import directory_signatures

    if isinstance(reference, TransformersReference):
        model_dir = reference.lm.model_dir
        files = sorted(p for p in model_dir.iterdir()
                       if p.suffix in (".safetensors", ".bin") and p.is_file())
        stamp = tuple((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files)
        weights = await asyncio.to_thread(_weights_sha256, str(model_dir), stamp)
        sig = directory_signatures(model_dir)
        return (f"transformers-float32|{sig.config_sha256}|{sig.tokenizer_sha256}|"
                f"{weights[:16]}")
    if isinstance(reference, ServeReference):
        sig = await reference.signatures()
        return f"serve|{reference.base_url}|{reference.served_model}|{sig.config_sha256}"
    return f"{type(reference).__name__}|{reference.model}"


def task_content_sha256(dataset_sha256: str, adapter: Any) -> str:
    """The dataset's sha256 and the task's config (templates, metrics, few-shot) together."""
    task = getattr(adapter, "task", None)
    if task is not None and hasattr(task, "dump_config"):
        config: Any = task.dump_config()
    elif hasattr(adapter, "config"):
        config = adapter.config.model_dump(mode="json")
    else:
        config = {}
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(f"{dataset_sha256}|{text}".encode()).hexdigest()


def mean_metrics(adapter: Any) -> list[str]:
    """The adapter's metrics aggregated by a plain mean (the ones a paired estimate is for)."""
    task = getattr(adapter, "task", None)
    if task is None:  # testbench's own tasks aggregate every metric by its mean
        return list(adapter.metric_names)
    from lm_eval.api.metrics import mean

    aggregation = task.aggregation()
    return [m for m in adapter.metric_names if aggregation.get(m.split(",", 1)[0], mean) is mean]


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = wire.earliest_stop(text, stop)
    return text[:cut] if cut >= 0 else text


def _generation(answer: ReferenceAnswer, text: str,
                encode: Callable[[str], list[int]]) -> ReferenceGeneration:
    """The reference's answer as kept: the text after its stop cut, and the tokens that
    spell it with their logprobs (when the cut text re-encodes to a prefix of the generated
    tokens; else its re-encoding without logprobs)."""
    ids = list(answer.token_ids)
    if text != answer.text:
        cut = encode(text) if text else []
        if cut == ids[:len(cut)]:
            ids = cut
        else:
            return ReferenceGeneration(text=text, token_ids=cut, logprobs=[], top_logprobs=[])
    scores = answer.scores[:len(ids)]
    return ReferenceGeneration(text=text, token_ids=ids, logprobs=[s.logprob for s in scores],
                               top_logprobs=[s.top_logprob for s in scores])


@dataclass
class DocWork:
    """Validator-side cost of computing docs: tokens the reference processed."""

    tokens: int = 0


async def compute_reference_docs(reference: TrustedReference, adapter: Any, set_id: str,
                                 docs: Mapping[int, dict[str, Any]], work: DocWork,
                                 *, batch_docs: int = BATCH_DOCS) -> list[ReferenceDoc]:
    """The reference's result on each of ``docs`` (doc id → row), ``batch_docs`` docs'
    requests per reference call."""
    ids = sorted(docs)
    out: list[ReferenceDoc] = []
    for start in range(0, len(ids), batch_docs):
        chunk = {d: docs[d] for d in ids[start:start + batch_docs]}
        if getattr(adapter, "output_type", None) == "signature":
            out += await _signature_docs(reference, adapter, set_id, chunk, work)
        else:
            out += await _lmeval_docs(reference, adapter, set_id, chunk, work)
    return out


async def _signature_docs(reference: TrustedReference, adapter: Any, set_id: str,
                          docs: Mapping[int, dict[str, Any]], work: DocWork
                          ) -> list[ReferenceDoc]:
    bodies = {d: adapter.request_body(doc)[1] for d, doc in docs.items()}
    out: list[ReferenceDoc] = []
    for max_tokens in sorted({wire.max_output_tokens(b) for b in bodies.values()}):
        group = [d for d, b in bodies.items() if wire.max_output_tokens(b) == max_tokens]
        answers = await reference.generate([str(bodies[d]["prompt"]) for d in group],
                                           max_tokens)
        for doc_id, answer in zip(group, answers, strict=True):
            work.tokens += len(answer.prompt_ids) + len(answer.token_ids)
            generation = _generation(answer, answer.text, reference.encode_continuation)
            # the signature task's metrics (SignatureTaskAdapter.score) of the answer
            metrics = {"answered": float(bool(answer.text.strip())),
                       "answer_tokens": float(len(answer.token_ids))}
            out.append(ReferenceDoc(set_id=set_id, doc_id=doc_id, metrics=metrics,
                                    generations=[generation]))
    return sorted(out, key=lambda r: r.doc_id)


async def _lmeval_docs(reference: TrustedReference, adapter: Any, set_id: str,
                       docs: Mapping[int, dict[str, Any]], work: DocWork) -> list[ReferenceDoc]:
    built = {d: adapter.build_instances(d, doc) for d, doc in docs.items()}
    requests: dict[int, list[ReferenceRequest]] = {d: [] for d in docs}
    generations: dict[int, list[ReferenceGeneration]] = {d: [] for d in docs}
    # every loglikelihood request of the chunk in one teacher-forced call
    likelihood = [(d, inst) for d, insts in built.items() for inst in insts
                  if inst.request_type in LOGLIKELIHOOD_TYPES]
    if likelihood:
        inputs = [adapter.loglikelihood_tokens(inst) for _, inst in likelihood]
        scored = await reference.logprobs([(tokens[:ctxlen], tokens[ctxlen:])
                                           for tokens, ctxlen in inputs])
        for (d, inst), (tokens, ctxlen), scores in zip(likelihood, inputs, scored, strict=True):
            work.tokens += len(tokens)
            ll = sum(s.logprob for s in scores)
            greedy = all(s.logprob == s.top_logprob for s in scores)
            inst.resps = [(ll, greedy)] * adapter.repeats
            requests[d].append(ReferenceRequest(context_tokens=ctxlen,
                                                continuation_tokens=len(tokens) - ctxlen,
                                                loglikelihood=ll, greedy=greedy))
    # generation requests, greedy, grouped by prompt kind and length limit
    asked: dict[tuple[bool, int], list[tuple[int, Any, Any, list[str]]]] = {}
    for d, insts in built.items():
        for inst in insts:
            if inst.request_type in LOGLIKELIHOOD_TYPES:
                continue
            body, _ = adapter.request_body(inst, adapter.model)
            (item,) = wire.prompt_items(body["prompt"])
            key = (isinstance(item, str), wire.max_output_tokens(body))
            asked.setdefault(key, []).append(
                (d, inst, item, wire.normalize_stop(body.get("stop"))))
    for (is_text, max_tokens), group in asked.items():
        items = [item for _, _, item, _ in group]
        answers = await (reference.generate(items, max_tokens) if is_text
                         else reference.generate_ids(items, max_tokens))
        for (d, inst, _, stop), answer in zip(group, answers, strict=True):
            work.tokens += len(answer.prompt_ids) + len(answer.token_ids)
            text = _cut_at_stop(answer.text, stop)
            inst.resps = [text] * adapter.repeats
            generations[d].append(_generation(answer, text, reference.encode_continuation))
    return [ReferenceDoc(set_id=set_id, doc_id=d, metrics=adapter.score_instances(built[d]),
                         requests=requests[d], generations=generations[d])
            for d in sorted(built)]


@dataclass(frozen=True)
class ReferencePair:
    """A (claimed model, task) whose reference results the loop keeps."""

    model: str
    task: str


def reference_pairs(settings: Settings) -> list[ReferencePair]:
    """Every (model with a reference, configured LLM leaf task)."""
    catalog = catalog_of(settings)
    try:
        tasks = leaf_task_names(settings.tasks, catalog)
    except TaskError as exc:
        log.warning("reference_docs.tasks_unresolved reason=%s", exc)
        tasks = list(settings.tasks)
    llm = [t for t in tasks if task_kind(t, Path(settings.datasets_dir)) == "llm"]
    return [ReferencePair(model, task) for model in settings.honesty.references
            for task in llm]


async def refresh_reference_docs(
    settings: Settings, mongo: MongoStores, datasets: DatasetStore,
    references: Mapping[str, TrustedReference], *, pairs: Sequence[ReferencePair] | None = None,
    max_docs: int | None = None, clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """One step: bring each pair's set to its task's current content and reference, at
    most ``max_docs`` docs computed in all (default ``honesty.reference_docs_chunk``).
    Returns per pair where its set stands (``set_id``, docs done of n, complete, or why it
    has none)."""
    budget = settings.honesty.reference_docs_chunk if max_docs is None else max_docs
    catalog = catalog_of(settings)
    report: dict[str, Any] = {}
    ready: list[tuple[ReferencePair, Any, TrustedReference]] = []
    for pair in pairs if pairs is not None else reference_pairs(settings):
        key = f"{pair.model}|{pair.task}"
        reference = references.get(pair.model)
        ref_settings = settings.honesty.references.get(pair.model)
        if reference is None or ref_settings is None or ref_settings.model_dir is None:
            report[key] = {"error": "no reference for the model"}
            continue
        try:
            ready.append((pair, load_adapter(pair.task, catalog, reference_node(
                pair.model, ref_settings.model_dir)), reference))
        except (TestbenchError, ValueError) as exc:
            report[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    # scoring tasks first: a generation task's docs cost a decode of up to max_gen_toks each
    ready.sort(key=lambda r: getattr(r[1], "output_type", "") == "generate_until")
    for pair, adapter, reference in ready:
        key = f"{pair.model}|{pair.task}"
        try:
            found = await _step(pair, adapter, reference, mongo, datasets, budget, clock)
        except (TestbenchError, ValueError) as exc:
            log.warning("reference_docs.pair_failed pair=%s reason=%s", key, exc)
            report[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        budget -= found.pop("computed", 0)
        report[key] = found
    return report


async def _step(pair: ReferencePair, adapter: Any, reference: TrustedReference,
                mongo: MongoStores, datasets: DatasetStore, budget: int,
                clock: Callable[[], float]) -> dict[str, Any]:
    registry = await datasets.get_registry(pair.task)
    if registry is None:
        raise TaskError(f"dataset of {pair.task} is not loaded")
    sha = task_content_sha256(registry.sha256, adapter)
    ref_id = await reference_identity(reference)
    set_id = reference_set_id(pair.model, pair.task, sha, ref_id)
    current = await mongo.reference_sets.get(set_id)
    now = clock()
    if current is None:
        for old in await mongo.reference_sets.for_task(pair.model, pair.task):
            if not old.stale and old.prompting == DEFAULT_PROMPTING:
                await mongo.reference_sets.put(old.model_copy(update={"stale": True,
                                                                      "updated_at": now}))
        n_docs = await datasets.count_docs(pair.task, adapter.eval_split)
        current = ReferenceSet(set_id=set_id, model=pair.model, task=pair.task,
                               task_sha256=sha, reference_id=ref_id,
                               output_type=str(adapter.output_type), n_docs=n_docs,
                               mean_metrics=mean_metrics(adapter), started_at=now,
                               updated_at=now)
        await mongo.reference_sets.put(current)
        log.info("reference_docs.set_started set=%s docs=%d", set_id, n_docs)
    computed = 0
    if not current.complete and budget > 0:
        done = await mongo.reference_docs.doc_ids(set_id)
        todo = [d for d in await datasets.doc_ids(pair.task, adapter.eval_split)
                if d not in done][:budget]
        rows = await datasets.fetch_docs(pair.task, adapter.eval_split, todo)
        work = DocWork()
        started = time.perf_counter()
        results = await compute_reference_docs(reference, adapter, set_id, rows, work)
        await mongo.reference_docs.record(results)
        computed = len(results)
        current = current.model_copy(update={
            "docs_done": len(done) + computed, "tokens": current.tokens + work.tokens,
            "seconds": current.seconds + time.perf_counter() - started,
            "updated_at": clock()})
        if current.docs_done >= current.n_docs:
            current = await _complete(current, adapter, mongo, clock)
        await mongo.reference_sets.put(current)
    return {"set_id": set_id, "docs_done": current.docs_done, "n_docs": current.n_docs,
            "complete": current.complete, "seconds": round(current.seconds, 3),
            "tokens": current.tokens, "computed": computed}


async def _complete(current: ReferenceSet, adapter: Any, mongo: MongoStores,
                    clock: Callable[[], float]) -> ReferenceSet:
    """The full-task scores (the task's own aggregation over every doc, in doc order), and
    the pair's stale sets deleted."""
    docs = await mongo.reference_docs.for_set(current.set_id)
    full: dict[str, float] = {}
    for metric in adapter.metric_names:
        values = [docs[d].metrics.get(metric, 0.0) for d in sorted(docs)]
        if values:
            full[metric] = float(adapter.aggregate(metric, values)[0])
    for old in await mongo.reference_sets.for_task(current.model, current.task):
        if old.stale and old.set_id != current.set_id:
            await mongo.reference_docs.delete_set(old.set_id)
            await mongo.reference_sets.delete(old.set_id)
    log.info("reference_docs.set_complete set=%s docs=%d seconds=%.1f", current.set_id,
             len(docs), current.seconds)
    return current.model_copy(update={"complete": True, "full": full,
                                      "completed_at": clock()})
