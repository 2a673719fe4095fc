"""The traffic check: the measuring traffic itself is the verification.

A verification round is one recognisable request; a node can answer it honestly and serve
something cheaper the rest of the time. Measuring traffic is what the node is paid for and
cannot tell from benchmark traffic because it *is* benchmark traffic, so the check
``traffic_substitution`` compares it with the trusted reference:

- **loglikelihood requests**, every one whose doc the reference has answered
  (``cluster/honesty/reference_docs.py``): the node's loglikelihood of the continuation
  (its echo, read as lm-eval reads it) against the reference's, per continuation token.
  Honest nodes differ by engine noise (~1e-5 nats); a request further than
  ``traffic_outlier_logprob_diff`` is an outlier, and one outlier is enough (a node
  cheating on a share q of requests is caught with 1 - (1 - q)^n over n requests).
- **temperature-0 generations** (the signature task, generation tasks): the node's answer
  against the reference's greedy answer to the same prompt, parting allowed only at a near
  tie (:func:`cluster.honesty.synthetic.judge_item`, the reference scoring the node's first
  parting token), and the logprobs the node reported on the common prefix against the
  reference's. This is what catches a launderer: it reports the claimed model's logprobs,
  but its tokens are another model's.
- **re-scored relays**: a sampled share of loglikelihood relays, every echoed token of their
  prompts teacher-forced by the reference (per-token differences over hundreds of tokens,
  and no reference set needed). The tokens the reference processes for partings and
  re-scores are budgeted at ``rescore_share`` of the tokens the node processed for its
  measuring traffic in the window, and reported (``validator_tokens``, ``validator_share``).
- **per-doc metric differences** (the paired scores' differences) are reported as evidence.

Which relays are re-scored is decided after the fact, from a validator secret (``salt``),
so a node cannot know which of its answers will be checked.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.core.errors import ErrorCode
from cluster.core.paired import (
    DEFAULT_PROMPTING,
    ReferenceDoc,
    ReferenceSet,
    counted_values,
    mean_stderr,
)
from cluster.core.schemas import Node, Prompt, Relay
from cluster.core.settings import Settings
from cluster.core.verdicts import Check, Outcome, VerdictRecord
from cluster.honesty.reference import (
    ReferenceAnswer,
    TokenScore,
    TrustedReference,
    align_token_ids,
)
from cluster.honesty.synthetic import common_prefix, judge_item
from cluster.honesty.verdicts import CHECK_SUBSTITUTION, CHECK_SYNTHETIC, VerdictSink
from cluster.storage.mongo import MongoStores
from cluster.wire import openai as wire

log = logging.getLogger(__name__)

CHECK = Check.TRAFFIC_SUBSTITUTION


@dataclass(frozen=True)
class TrafficDoc:
    """One sampled doc of a node: its score, and the requests and answers behind it."""

    task: str
    doc_id: int
    error_code: ErrorCode
    metrics: Mapping[str, float]
    prompts: Sequence[Prompt]
    relays: Sequence[Relay]
    created_at: float = 0.0

    def exchanges(self) -> list[tuple[Prompt, Relay]]:
        """(prompt, relay) pairs of OK relays, in request order."""
        by_index = {r.request_index: r for r in self.relays if r.error_code == ErrorCode.OK}
        return [(p, by_index[p.request_index]) for p in sorted(self.prompts,
                                                                key=lambda p: p.request_index)
                if p.request_index in by_index and isinstance(by_index[p.request_index].response,
                                                              dict)]


@dataclass(frozen=True)
class TaskReference:
    """A task's complete reference set and its per-doc results (of the docs needed)."""

    set: ReferenceSet
    docs: Mapping[int, ReferenceDoc]


@dataclass
class TrafficStats:
    docs: int = 0
    loglikelihood_requests: int = 0
    ll_diffs: list[float] = field(default_factory=list)  # per request, per continuation token
    greedy_mismatches: int = 0
    generations: int = 0
    exact_generations: int = 0
    parted: int = 0
    parted_regrets: list[float] = field(default_factory=list)
    generation_diffs: list[float] = field(default_factory=list)  # per token, common prefix
    metric_docs: int = 0
    differing_docs: int = 0
    metric_diffs: dict[str, tuple[float, float | None, int]] = field(default_factory=dict)
    rescored_relays: int = 0
    rescored_diffs: list[float] = field(default_factory=list)  # per relay, per token
    validator_tokens: int = 0
    measuring_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    @property
    def comparisons(self) -> int:
        return self.loglikelihood_requests + self.generations + self.rescored_relays

    def as_evidence(self, outlier: float) -> dict[str, Any]:
        def mean(xs: Sequence[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        # generations judged: exact ones, and partings scored within the budget
        judged = self.generations - self.skipped.get("parting_over_budget", 0)

        return {
            "docs": self.docs,
            "loglikelihood_requests": self.loglikelihood_requests,
            "mean_abs_ll_diff": mean(self.ll_diffs),
            "max_abs_ll_diff": max(self.ll_diffs) if self.ll_diffs else None,
            "outlier_requests": sum(1 for d in self.ll_diffs if d > outlier),
            "greedy_mismatches": self.greedy_mismatches,
            "generations": self.generations,
            "exact_generations": self.exact_generations,
            "parted_generations": self.parted,
            "parted_share": self.parted / judged if judged else None,
            "parted_regrets": [round(r, 4) for r in self.parted_regrets[:10]],
            "generation_mean_abs_logprob_diff": mean(self.generation_diffs),
            "metric_docs": self.metric_docs,
            "differing_docs": self.differing_docs,
            "metric_diffs": {m: {"mean": a, "stderr": b, "n": n}
                             for m, (a, b, n) in self.metric_diffs.items()},
            "rescored_relays": self.rescored_relays,
            "rescored_mean_abs_diff": mean(self.rescored_diffs),
            "rescored_max_abs_diff": max(self.rescored_diffs) if self.rescored_diffs else None,
            "rescored_outliers": sum(1 for d in self.rescored_diffs if d > outlier),
            "validator_tokens": self.validator_tokens,
            "measuring_tokens": self.measuring_tokens,
            "validator_share": (self.validator_tokens / self.measuring_tokens
                                if self.measuring_tokens else None),
            "skipped": dict(self.skipped),
        }


class Rescorer:
    """The reference's teacher-forced scores of (prompt, continuation) token ids, kept per
    pair (a relay re-scored in one step is not re-scored in the next, and every node's
    relay of one doc carries the same tokens); ``spent`` counts the tokens it computed. The
    traffic check reports the tokens it *asked* for, what a validator without this memory
    would compute."""

    def __init__(self, reference: TrustedReference, max_items: int = 4096) -> None:
        self.reference = reference
        self._known: dict[tuple[tuple[int, ...], tuple[int, ...]], list[TokenScore]] = {}
        self._max = max_items
        self.spent = 0

    async def score(self, items: Sequence[tuple[Sequence[int], Sequence[int]]]
                    ) -> list[list[TokenScore]]:
        keys = [(tuple(p), tuple(c)) for p, c in items]
        missing = [k for k in dict.fromkeys(keys) if k not in self._known]
        if missing:
            found = await self.reference.logprobs([(list(p), list(c)) for p, c in missing])
            self.spent += sum(len(p) + len(c) for p, c in missing)
            if len(self._known) + len(missing) > self._max:
                self._known.clear()
            self._known.update(zip(missing, found, strict=True))
        return [list(self._known.get(k) or []) for k in keys]


def _selection_key(salt: str, prompt_id: str) -> str:
    return hashlib.sha256(f"{salt}|{prompt_id}".encode()).hexdigest()


def _is_loglikelihood(body: Mapping[str, Any]) -> bool:
    return bool(body.get("echo")) and wire.max_output_tokens(body) <= 1


def _temperature_zero(body: Mapping[str, Any]) -> bool:
    return body.get("temperature", 1.0) == 0


def _measuring_tokens(doc: TrafficDoc) -> int:
    total = 0
    for prompt, relay in doc.exchanges():
        usage = (relay.response or {}).get("usage")
        completion = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
        total += int(prompt.prompt_tokens or 0) + (
            int(completion) if isinstance(completion, int) else int(prompt.max_output_tokens))
    return total


def _echo_choices(prompt: Prompt, relay: Relay) -> list[tuple[list[int], wire.CompletionChoice]]:
    """The (token ids sent, choice) pairs of a loglikelihood exchange (token-id prompts)."""
    items = wire.prompt_items(prompt.body.get("prompt"))
    if not all(isinstance(i, list) for i in items):
        return []
    choices = wire.parse_completion(relay.response, len(items))
    return [(list(i), c) for i, c in zip(items, choices, strict=True) if isinstance(i, list)]


class TrafficJudge:
    """Judges one node's traffic against the references of its claimed model."""

    def __init__(self, settings: Settings, rescorer: Rescorer, *, salt: str) -> None:
        self.s = settings.honesty
        self.rescorer = rescorer
        self.salt = salt

    async def stats(self, docs: Sequence[TrafficDoc], references: Mapping[str, TaskReference]
                    ) -> TrafficStats:
        st = TrafficStats(docs=len(docs))
        st.measuring_tokens = sum(_measuring_tokens(d) for d in docs)
        budget = int(self.s.rescore_share * st.measuring_tokens)
        self._metric_diffs(st, docs, references)
        partings: list[tuple[ReferenceAnswer, str, list[int], list[int]]] = []
        for doc in docs:
            ref = references.get(doc.task)
            ref_doc = ref.docs.get(doc.doc_id) if ref is not None else None
            if doc.error_code != ErrorCode.OK:
                continue
            gen_index = 0
            echoes: list[tuple[list[int], wire.CompletionChoice]] = []
            for prompt, relay in doc.exchanges():
                body = prompt.body
                if _is_loglikelihood(body):
                    try:
                        echoes += _echo_choices(prompt, relay)
                    except wire.MalformedAnswer:
                        st.skip("malformed_echo")
                elif prompt.path == wire.COMPLETIONS_PATH and _temperature_zero(body):
                    expected_gen = (ref_doc.generations[gen_index]
                                    if ref_doc is not None and gen_index < len(ref_doc.generations)
                                    else None)
                    gen_index += 1
                    if expected_gen is None:
                        continue
                    parting = self._compare_generation(st, prompt, relay, expected_gen)
                    if parting is not None:
                        partings.append(parting)
            if echoes and ref_doc is not None:
                # one echo per loglikelihood request, in the doc's request order (a task
                # repeating its requests sends more: not compared)
                if len(echoes) != len(ref_doc.requests):
                    st.skip("request_count_mismatch")
                    continue
                for (tokens, choice), expected in zip(echoes, ref_doc.requests, strict=True):
                    self._compare_loglikelihood(st, tokens, choice, expected)
        await self._judge_partings(st, partings, budget)
        await self._rescore(st, docs, budget - st.validator_tokens)
        return st

    # -- per-doc metrics -----------------------------------------------------------------

    def _metric_diffs(self, st: TrafficStats, docs: Sequence[TrafficDoc],
                      references: Mapping[str, TaskReference]) -> None:
        rows_by_task: dict[str, list[dict[str, Any]]] = {}
        for doc in docs:
            rows_by_task.setdefault(doc.task, []).append(
                {"doc_id": doc.doc_id, "error_code": int(doc.error_code),
                 "metrics": dict(doc.metrics), "created_at": doc.created_at})
        differing: set[tuple[str, int]] = set()
        paired_docs: set[tuple[str, int]] = set()
        for task, rows in rows_by_task.items():
            ref = references.get(task)
            if ref is None:
                continue
            for metric in ref.set.mean_metrics:
                node = counted_values(rows, metric)
                both = sorted(d for d in node if d in ref.docs and metric in ref.docs[d].metrics)
                if not both:
                    continue
                diffs = [node[d] - ref.docs[d].metrics[metric] for d in both]
                mean, stderr = mean_stderr(diffs)
                st.metric_diffs[f"{task}:{metric}"] = (mean, stderr, len(both))
                paired_docs.update((task, d) for d in both)
                differing.update((task, d) for d, x in zip(both, diffs, strict=True) if x != 0)
        st.metric_docs = len(paired_docs)
        st.differing_docs = len(differing)

    # -- loglikelihood requests ------------------------------------------------------------

    def _compare_loglikelihood(self, st: TrafficStats, tokens: list[int],
                               choice: wire.CompletionChoice, expected: Any) -> None:
        lps = choice.token_logprobs
        ctxlen, n_cont = expected.context_tokens, expected.continuation_tokens
        if (lps is None or n_cont <= 0 or ctxlen + n_cont != len(tokens)
                or len(lps) < len(tokens)):
            st.skip("echo_not_aligned")
            return
        span = lps[ctxlen:ctxlen + n_cont]
        if any(v is None for v in span):
            st.skip("echo_not_aligned")
            return
        ll = sum(float(v) for v in span if v is not None)
        st.loglikelihood_requests += 1
        st.ll_diffs.append(abs(ll - expected.loglikelihood) / n_cont)
        tops = choice.top_logprobs
        if tops is not None and len(tops) >= ctxlen + n_cont:
            greedy = all(t is None or v is None or v >= t
                         for v, t in zip(span, tops[ctxlen:ctxlen + n_cont], strict=True))
            st.greedy_mismatches += int(greedy != expected.greedy)

    # -- generations -----------------------------------------------------------------------

    def _compare_generation(self, st: TrafficStats, prompt: Prompt, relay: Relay, expected: Any
                            ) -> tuple[ReferenceAnswer, str, list[int], list[int]] | None:
        try:
            (choice,) = wire.parse_completion(relay.response, 1)
            (item,) = wire.prompt_items(prompt.body.get("prompt"))
        except (wire.MalformedAnswer, ValueError):
            st.skip("unparsed_generation")
            return None
        reference = self.rescorer.reference
        prompt_ids = (reference.encode_prompt(item) if isinstance(item, str)
                      else [int(t) for t in item])
        ids, _ = align_token_ids(choice.text, choice.tokens, reference.encode_continuation)
        if choice.text == expected.text or ids == list(expected.token_ids):
            ids = list(expected.token_ids)
        st.generations += 1
        # direction (b) on the common prefix: the logprobs the node reported for the
        # reference's own tokens
        prefix = common_prefix(expected.token_ids, ids)
        lps = choice.token_logprobs
        if lps is not None and expected.logprobs:
            for i in range(min(prefix, len(lps), len(expected.logprobs))):
                if lps[i] is not None:
                    st.generation_diffs.append(abs(float(lps[i]) - expected.logprobs[i]))
        answer = ReferenceAnswer("", tuple(prompt_ids), expected.text,
                                 tuple(expected.token_ids), ())
        if choice.text == expected.text or ids == list(expected.token_ids):
            st.exact_generations += 1
            return None
        return answer, choice.text, ids, prompt_ids

    async def _judge_partings(self, st: TrafficStats,
                              partings: list[tuple[ReferenceAnswer, str, list[int], list[int]]],
                              budget: int) -> None:
        """The reference scores each parting answer's first parting token (one forward of
        prompt + common prefix), within ``budget`` tokens; an answer over it is not judged."""
        kept: list[tuple[ReferenceAnswer, str, list[int], list[int]]] = []
        items: list[tuple[list[int], list[int]]] = []
        for parting in partings:
            answer, _, ids, prompt_ids = parting
            item = (prompt_ids, ids[:common_prefix(answer.token_ids, ids) + 1])
            cost = len(item[0]) + len(item[1])
            if st.validator_tokens + cost > budget:
                st.skip("parting_over_budget")
                continue
            st.validator_tokens += cost
            kept.append(parting)
            items.append(item)
        if not items:
            return
        scores = await self.rescorer.score(items)
        for (answer, text, ids, _), scored in zip(kept, scores, strict=True):
            item = judge_item(answer, text, ids, scored, self.s.synthetic_tie_margin)
            if not item.agrees:
                st.parted += 1
                if item.divergence_regret is not None:
                    st.parted_regrets.append(item.divergence_regret)

    # -- re-scored relays --------------------------------------------------------------------

    async def _rescore(self, st: TrafficStats, docs: Sequence[TrafficDoc], budget: int) -> None:
        candidates: list[tuple[str, list[tuple[list[int], wire.CompletionChoice]]]] = []
        for doc in docs:
            if doc.error_code != ErrorCode.OK:
                continue
            for prompt, relay in doc.exchanges():
                if not _is_loglikelihood(prompt.body):
                    continue
                try:
                    pairs = _echo_choices(prompt, relay)
                except wire.MalformedAnswer:
                    continue
                if pairs:
                    candidates.append((prompt.prompt_id, pairs))
        candidates.sort(key=lambda c: _selection_key(self.salt, c[0]))
        chosen: list[list[tuple[list[int], wire.CompletionChoice]]] = []
        for _, pairs in candidates:
            cost = sum(len(t) for t, _ in pairs)
            if cost > budget:
                break
            budget -= cost
            chosen.append(pairs)
        if not chosen:
            return
        flat = [(tokens[:1], tokens[1:]) for pairs in chosen for tokens, _ in pairs]
        st.validator_tokens += sum(len(p) + len(c) for p, c in flat)
        scores = iter(await self.rescorer.score(flat))
        for pairs in chosen:
            diffs: list[float] = []
            for _, choice in pairs:
                ref = next(scores)
                lps = choice.token_logprobs or ()
                for i, score in enumerate(ref, start=1):
                    if i < len(lps) and lps[i] is not None:
                        diffs.append(abs(float(lps[i]) - score.logprob))  # type: ignore[arg-type]
            if diffs:
                st.rescored_relays += 1
                st.rescored_diffs.append(sum(diffs) / len(diffs))

    # -- the verdict ---------------------------------------------------------------------------

    def judge(self, node_id: str, st: TrafficStats, probes: Mapping[str, str] | None = None
              ) -> tuple[Outcome, str, dict[str, Any]]:
        s = self.s
        evidence = st.as_evidence(s.traffic_outlier_logprob_diff)
        evidence["thresholds"] = {
            "max_mean_abs_logprob_diff": s.max_mean_abs_logprob_diff,
            "traffic_outlier_logprob_diff": s.traffic_outlier_logprob_diff,
            "traffic_min_outliers": s.traffic_min_outliers,
            "traffic_max_parted_share": s.traffic_max_parted_share,
            "rescore_share": s.rescore_share,
        }
        if probes:
            evidence["probes"] = dict(probes)
        if st.comparisons < s.traffic_min_comparisons:
            return (Outcome.UNKNOWN, f"unknown: {st.comparisons} requests compared with the "
                    f"reference (need {s.traffic_min_comparisons})", evidence)
        problems: list[str] = []
        limit = s.max_mean_abs_logprob_diff
        mean_ll = evidence["mean_abs_ll_diff"]
        if mean_ll is not None and mean_ll > limit:
            problems.append(f"mean |loglikelihood - reference| {mean_ll:.4f}/token > {limit}")
        outliers = evidence["outlier_requests"] + evidence["rescored_outliers"]
        if outliers >= s.traffic_min_outliers:
            problems.append(f"{outliers} requests more than {s.traffic_outlier_logprob_diff} "
                            "nats/token from the reference")
        rescored = evidence["rescored_mean_abs_diff"]
        if rescored is not None and rescored > limit:
            problems.append(f"re-scored relays: mean |logprob - reference| {rescored:.4f} > "
                            f"{limit}")
        share = evidence["parted_share"]
        if share is not None and st.parted and share > s.traffic_max_parted_share:
            problems.append(f"{st.parted} of {st.generations} temperature-0 answers part "
                            "from the reference's greedy answer (not at a near tie)")
        gen = evidence["generation_mean_abs_logprob_diff"]
        if gen is not None and gen > limit:
            problems.append(f"reported logprobs of the reference's tokens: mean |diff| "
                            f"{gen:.4f} > {limit}")
        if problems:
            passed = [c for c, o in (probes or {}).items() if o == Outcome.PASS.value]
            suffix = (f" (while its verification probes pass: {', '.join(passed)})"
                      if passed and len(passed) == len(probes or {}) else "")
            return Outcome.FAIL, "measuring traffic deviates: " + "; ".join(problems) + suffix, \
                evidence
        return (Outcome.PASS, f"measuring traffic matches the reference ({st.comparisons} "
                f"requests compared)", evidence)


async def judged_verdict(judge: TrafficJudge, node_id: str, docs: Sequence[TrafficDoc],
                         references: Mapping[str, TaskReference], *, verdict_id: str, ts: float,
                         probes: Mapping[str, str] | None = None) -> VerdictRecord:
    st = await judge.stats(docs, references)
    outcome, reason, evidence = judge.judge(node_id, st, probes)
    return VerdictRecord(verdict_id=verdict_id, node_id=node_id, check=CHECK, outcome=outcome,
                         reason=reason, evidence=_storable(evidence), ts=ts)


def _storable(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return round(value, 8) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


# -- the loop's step ---------------------------------------------------------------------------

async def node_traffic(mongo: MongoStores, node_id: str, tasks: Sequence[str], since: float
                       ) -> list[TrafficDoc]:
    """The node's counted samples of ``tasks`` created after ``since``, with their prompts
    and relays."""
    samples = [s for task in tasks for s in await mongo.samples.valid_since(node_id, task, since)]
    if not samples:
        return []
    prompts = await mongo.prompts.by_sample_keys([s.sample_key for s in samples])
    ids = [p.prompt_id for ps in prompts.values() for p in ps]
    relays = await mongo.relays.get_for_prompts(ids)
    out = []
    for sample in samples:
        mine = prompts.get(sample.sample_key, [])
        out.append(TrafficDoc(sample.task, sample.doc_id, sample.error_code, sample.metrics,
                              mine, [relays[p.prompt_id] for p in mine if p.prompt_id in relays],
                              sample.created_at))
    return out


async def task_references(mongo: MongoStores, model: str, docs: Sequence[TrafficDoc]
                          ) -> dict[str, TaskReference]:
    """The complete, current reference sets of ``model`` for the tasks of ``docs``, with
    the per-doc results of those docs."""
    tasks = sorted({d.task for d in docs})
    sets = await mongo.reference_sets.usable([(model, t) for t in tasks], DEFAULT_PROMPTING)
    out: dict[str, TaskReference] = {}
    for (_, task), found in sets.items():
        wanted = [d.doc_id for d in docs if d.task == task]
        out[task] = TaskReference(found, await mongo.reference_docs.for_set(found.set_id, wanted))
    return out


def default_prompting(node: Node) -> bool:
    """Whether the node's requests are the ones the reference answered (completions,
    lm-eval's default prompting)."""
    return (node.api == "completions" and not node.apply_chat_template
            and node.system_instruction is None)


async def check_traffic(settings: Settings, mongo: MongoStores, nodes: Sequence[Node],
                        references: Mapping[str, TrustedReference],
                        rescorers: dict[str, Rescorer], *, salt: str, sink: VerdictSink,
                        clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """One traffic check over every LLM node with a reference for its model: judge the
    samples of the buffer TTL window, write one ``traffic_substitution`` verdict per node
    (replaced within a TTL epoch), and report outcomes and the validator's cost."""
    now = clock()
    ttl = settings.manager.sample_ttl_s
    since = now - ttl
    verdicts: list[VerdictRecord] = []
    report: dict[str, Any] = {}
    latest = {(r.node_id, r.check.value): r.outcome.value
              for r in await mongo.verdicts.latest([n.node_id for n in nodes])}
    for node in nodes:
        reference = references.get(node.model)
        if node.kind != "llm" or reference is None:
            continue
        rescorer = rescorers.setdefault(node.model, Rescorer(reference))
        docs = await node_traffic(mongo, node.node_id, list(settings.tasks), since)
        if not docs:
            continue
        refs = (await task_references(mongo, node.model, docs)
                if default_prompting(node) else {})
        probes = {c: latest[(node.node_id, c)] for c in (CHECK_SUBSTITUTION, CHECK_SYNTHETIC)
                  if (node.node_id, c) in latest}
        judge = TrafficJudge(settings, rescorer, salt=f"{salt}|{node.node_id}")
        verdict = await judged_verdict(
            judge, node.node_id, docs, refs,
            verdict_id=f"{CHECK.value}|{node.node_id}|{int(now // ttl) if ttl else 0}",
            ts=clock(), probes=probes)
        verdicts.append(verdict)
        report[node.node_id] = {"outcome": verdict.outcome.value,
                                "validator_tokens": verdict.evidence.get("validator_tokens"),
                                "measuring_tokens": verdict.evidence.get("measuring_tokens")}
    if verdicts:
        await sink.record(verdicts)
    return report
