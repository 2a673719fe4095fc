"""One verification round: signatures, identity, synthetic jobs and the substitution check
for every node claiming a model, against that model's trusted reference.

A round, for the nodes claiming model M and M's reference R:

1. draw the round's probes from its seed (:mod:`cluster.honesty.probes`);
2. at once: R answers every probe greedily; every node is asked for its signatures and
   answers every probe in **one** shuffled, batched temperature-0 ``/v1/completions``
   request with ``logprobs=1`` (chat nodes: one request per probe), so probes of different
   checks are indistinguishable and cost one round trip;
3. at once: every completions node scores R's canary answers (lm-eval's echo request), and
   R scores every node's canary and synthetic answers teacher-forced (pairs shared by
   several nodes, e.g. honest ones, are scored once);
4. judge each check per node; identity is judged across all nodes of the round.

Nodes registered with ``seeded_sampling`` get one more request in step 2: the round's
``sampled`` prompts at temperature ``sampled_temperature`` with the round's seed, asking for
the answers' token ids; in step 3 the reference replays them teacher-forced
(:mod:`cluster.honesty.seeded_sampling`) and the ``seeded_sampling`` check counts the tokens
that are not the reference's pick. It catches a node that is honest at temperature 0 and
cheap above it, which every temperature-0 check passes.

Verdicts carry their evidence and the traffic they cost; :func:`record_verdicts` writes
them to MongoDB. Failures of the node are verdicts (``unknown`` when it did not answer,
``fail`` when it answered nonsense); failures of the reference raise
:class:`~cluster.honesty.reference.ReferenceUnavailable` (nothing is blamed on a node).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from cluster.core.schemas import ApiKind, Node
from cluster.core.settings import HonestySettings
from cluster.core.verdicts import DETAIL_CHECKS, VerdictRecord
from cluster.honesty.evasion import ProbeState, judge_round_evasion
from cluster.honesty.probes import ProbeKind, ProbeSet, build_probes
from cluster.honesty.reference import (
    ExpectedSignatures,
    ReferenceAnswer,
    TokenScore,
    TrustedReference,
    align_token_ids,
)
from cluster.honesty.seeded_sampling import ReplayResult, SeededAnswer, judge_replay
from cluster.honesty.substitution import (
    EchoScores,
    SubstitutionThresholds,
    judge_substitution,
    substitution_stats,
)
from cluster.honesty.synthetic import SyntheticItem, common_prefix, judge_item, judge_synthetic
from cluster.honesty.traffic import record_round_traffic
from cluster.honesty.verdicts import (
    CHECK_CONFIG,
    CHECK_IDENTITY,
    CHECK_SEEDED,
    CHECK_SUBSTITUTION,
    CHECK_SYNTHETIC,
    CHECK_TOKENIZER,
    CHECKS,
    PROBES_KEY,
    ROUND_CHECKS,
    Outcome,
    Traffic,
    Verdict,
    VerdictSink,
)
from cluster.nodes.policy import EndpointGuard, EndpointRefusedError
from cluster.nodes.transport import (
    NodeEndpoint,
    NodeTransport,
    NodeUnavailable,
    open_node_session,
)
from cluster.storage.mongo import MongoStores
from cluster.tasks.identity import judge_identities, reference_hashes, signature_from_answers
from cluster.wire import openai as wire

log = logging.getLogger(__name__)

NO_ENDPOINT_STATUSES = (404, 405, 501)


@dataclass(frozen=True)
class NodeTarget:
    """A node as the checks see it: where it is, what it claims, who runs it, and its
    seniority (lower = registered earlier; decides who holds a shared identity)."""

    node_id: str
    base_url: str
    model: str
    api: ApiKind = "completions"
    operator: str | None = None
    seniority: float = 0.0
    seeded_sampling: bool = False

    @classmethod
    def from_node(cls, node: Node, *, operator: str | None = None, seniority: float = 0.0
                  ) -> NodeTarget:
        return cls(node.node_id, node.base_url, node.model, node.api, operator, seniority,
                   node.seeded_sampling)

    @property
    def operator_name(self) -> str:
        return self.operator or self.node_id


@dataclass
class _Exchange:
    """What one node answered in this round."""

    target: NodeTarget
    signatures: dict[str, str | Exception] = field(default_factory=dict)
    answers: list[wire.CompletionChoice | None] = field(default_factory=list)
    answer_ids: list[list[int]] = field(default_factory=list)
    generation_error: Exception | None = None
    generation_latency_s: float | None = None
    echo: list[EchoScores | None] | None = None
    echo_error: Exception | None = None
    shares: list[float] = field(default_factory=list)
    sampled: list[SeededAnswer] | None = None  # None: not asked (or could not be)
    sampled_error: Exception | None = None
    replayed: list[ReplayResult] = field(default_factory=list)
    traffic: dict[str, Traffic] = field(default_factory=dict)

    def charge(self, check: str, traffic: Traffic) -> None:
        self.traffic[check] = self.traffic.get(check, Traffic()) + traffic


@dataclass(frozen=True)
class RoundReport:
    round_id: str
    seed: int
    model: str
    verdicts: list[Verdict]
    started_at: float
    finished_at: float

    def traffic(self, node_id: str) -> Traffic:
        total = Traffic()
        for verdict in self.verdicts:
            if verdict.node_id == node_id:
                total = total + verdict.traffic
        return total


_CHECK_OF_KIND: dict[ProbeKind, str] = {
    "identity": CHECK_IDENTITY, "synthetic": CHECK_SYNTHETIC, "canary": CHECK_SUBSTITUTION}


class _CachedScorer:
    """The reference's teacher-forced scores, computed once per (prompt, continuation) in
    a round; its own answers are known from generation (an honest node's answers cost no
    extra reference compute)."""

    def __init__(self, reference: TrustedReference, answers: Sequence[ReferenceAnswer]) -> None:
        self._reference = reference
        self._known: dict[tuple[tuple[int, ...], tuple[int, ...]], list[TokenScore]] = {}
        for answer in answers:
            for n in range(len(answer.token_ids) + 1):
                self._known[(answer.prompt_ids, answer.token_ids[:n])] = list(answer.scores[:n])

    async def score(self, items: Sequence[tuple[list[int], list[int]]]
                    ) -> list[list[TokenScore]]:
        keys = [(tuple(p), tuple(c)) for p, c in items]
        missing = [k for k in dict.fromkeys(keys) if k not in self._known]
        if missing:
            found = await self._reference.logprobs([(list(p), list(c)) for p, c in missing])
            self._known.update(zip(missing, found, strict=True))
        return [list(self._known[k]) for k in keys]


class UnsupportedApi(Exception):
    """The node's API cannot carry this check (chat-only nodes: no prompt lists, no echo)."""


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


class Verifier:
    """Runs verification rounds for the nodes claiming one reference's model.

    ``http`` is the nodes' session; ``guard``: the endpoint policy it was opened with
    (:func:`~cluster.nodes.transport.open_node_session`), whose address literals are checked
    before each request. :func:`run_verification` always gives one.
    """

    def __init__(
        self,
        settings: HonestySettings,
        reference: TrustedReference,
        http: aiohttp.ClientSession,
        *,
        guard: EndpointGuard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.reference = reference
        self._http = http
        self._transport = NodeTransport(http, guard=guard)
        self._clock = clock

    def thresholds(self) -> SubstitutionThresholds:
        s = self.settings
        return SubstitutionThresholds(
            max_mean_abs_logprob_diff=s.max_mean_abs_logprob_diff,
            max_mean_regret=s.max_mean_regret,
            min_reference_agreement=s.min_reference_agreement,
            min_node_agreement=s.min_node_agreement,
            tie_margin=s.tie_margin,
        )

    def probes(self, seed: int) -> ProbeSet:
        s = self.settings
        return build_probes(seed, identity=s.identity_prompts, identity_words=s.identity_words,
                            synthetic=s.synthetic_prompts, canary=s.canary_prompts,
                            sampled=s.sampled_prompts)

    def asks_sampled(self, target: NodeTarget) -> bool:
        """Whether the round sends ``target`` the seeded sampled request."""
        return (target.seeded_sampling and target.api == "completions"
                and self.settings.sampled_prompts > 0)

    # -- talking to nodes -------------------------------------------------------------------

    def _client(self, target: NodeTarget) -> NodeEndpoint:
        return NodeEndpoint(target.base_url, self._transport, self.settings.request_timeout_s)

    async def _signatures(self, ex: _Exchange) -> None:
        client = self._client(ex.target)
        for check, path in ((CHECK_TOKENIZER, wire.TOKENIZER_SIGNATURE_PATH),
                            (CHECK_CONFIG, wire.CONFIG_SIGNATURE_PATH)):
            ex.charge(check, Traffic(requests=1))
            try:
                ex.signatures[check] = wire.signature_sha256(await client.get_json(path))
            except (NodeUnavailable, wire.MalformedAnswer) as exc:
                ex.signatures[check] = exc

    async def _generate(self, ex: _Exchange, order: list[tuple[ProbeKind, int, str]],
                        seed: int) -> None:
        client = self._client(ex.target)
        n = len(order)
        max_tokens = self.settings.max_tokens
        shares = [1.0 / n] * n  # one request, split between the prompts it carried
        if ex.target.api != "completions":
            ex.generation_error = UnsupportedApi(
                f"{ex.target.api} node: the checks need /v1/completions (prompt lists, echo)")
            ex.answers = [None] * n
            shares = [0.0] * n
        else:
            texts = [p for _, _, p in order]
            model = ex.target.model
            try:
                if self.settings.batch_probes:
                    body = wire.completion_body(model, texts, max_tokens, seed=seed, logprobs=1)
                    answer, latency = await client.post_json(wire.COMPLETIONS_PATH, body)
                    ex.answers = list(wire.parse_completion(answer, n))
                    ex.generation_latency_s = latency
                else:
                    # One request per probe, as measuring traffic looks (lm-eval sends one
                    # prompt per request): a node cannot single the probes out by shape.
                    answers = await asyncio.gather(*[client.post_json(
                        wire.COMPLETIONS_PATH,
                        wire.completion_body(model, [t], max_tokens, seed=seed, logprobs=1))
                        for t in texts])
                    ex.answers = [wire.parse_completion(a, 1)[0] for a, _ in answers]
                    ex.generation_latency_s = sum(lat for _, lat in answers) / n
                    shares = [1.0] * n
            except (NodeUnavailable, wire.MalformedAnswer) as exc:
                ex.generation_error = exc
                ex.answers = [None] * n
        ex.shares = shares

    def _align(self, ex: _Exchange, order: list[tuple[ProbeKind, int, str]],
               reference_answers: Sequence[ReferenceAnswer]) -> None:
        """The node's answers as token ids (the reference's own ids where the texts are
        equal), and the generation request's traffic, split between the checks."""
        encode = self.reference.encode_continuation
        ex.answer_ids = []
        for answer, ref in zip(ex.answers, reference_answers, strict=True):
            if answer is None:
                ex.answer_ids.append([])
            elif answer.text == ref.text:
                ex.answer_ids.append(list(ref.token_ids))
            else:
                ex.answer_ids.append(align_token_ids(answer.text, answer.tokens, encode)[0])
        for (kind, _, _), ref, share, ids in zip(order, reference_answers, ex.shares,
                                                 ex.answer_ids, strict=True):
            ex.charge(_CHECK_OF_KIND[kind], Traffic(share, len(ref.prompt_ids), len(ids)))

    async def _sample(self, ex: _Exchange, prompts: Sequence[str], seed: int) -> None:
        """The seeded sampled request: every prompt with the round's seed, one request."""
        if not self.asks_sampled(ex.target) or not prompts:
            return
        s = self.settings
        ids = [self.reference.encode_prompt(p) for p in prompts]
        body = wire.seeded_completion_body(ex.target.model, ids, s.sampled_max_tokens,
                                           seed=seed, temperature=s.sampled_temperature)
        try:
            answer, _ = await self._client(ex.target).post_json(wire.COMPLETIONS_PATH, body)
            wire.parse_completion(answer, len(ids))  # the shape every answer must have
            tokens = [wire.choice_token_ids(answer, i) for i in range(len(ids))]
        except (NodeUnavailable, wire.MalformedAnswer) as exc:
            ex.sampled_error = exc
            ex.charge(CHECK_SEEDED, Traffic(1, sum(map(len, ids)), 0))
            return
        ex.sampled = [SeededAnswer(tuple(p), tuple(t[:s.sampled_max_tokens]), seed,
                                   s.sampled_temperature) for p, t in zip(ids, tokens,
                                                                          strict=True)]
        ex.charge(CHECK_SEEDED, Traffic(1, sum(map(len, ids)), sum(map(len, tokens))))

    async def _replay(self, ex: _Exchange) -> None:
        if ex.sampled:
            ex.replayed = await self.reference.replay_seeded(ex.sampled)

    async def _echo(self, ex: _Exchange, canaries: list[tuple[list[int], list[int]]],
                    seed: int) -> None:
        if ex.target.api != "completions" or ex.generation_error is not None or not canaries:
            return
        client = self._client(ex.target)
        asked = [p + c for p, c in canaries]
        model = ex.target.model
        batched = self.settings.batch_probes
        ex.charge(CHECK_SUBSTITUTION, Traffic(1 if batched else len(asked),
                                              sum(len(a) for a in asked), len(asked)))
        try:
            if batched:
                body = wire.completion_body(model, asked, 1, seed=seed, logprobs=1, echo=True)
                answer, _ = await client.post_json(wire.COMPLETIONS_PATH, body)
                choices = wire.parse_completion(answer, len(asked))
            else:
                answers = await asyncio.gather(*[client.post_json(
                    wire.COMPLETIONS_PATH,
                    wire.completion_body(model, [a], 1, seed=seed, logprobs=1, echo=True))
                    for a in asked])
                choices = [wire.parse_completion(a, 1)[0] for a, _ in answers]
        except (NodeUnavailable, wire.MalformedAnswer) as exc:
            ex.echo_error = exc
            return
        echo: list[EchoScores | None] = []
        for (prompt, cont), choice in zip(canaries, choices, strict=True):
            lps, tops = choice.token_logprobs, choice.top_logprobs
            span = range(len(prompt), len(prompt) + len(cont))
            if lps is None or len(lps) < span.stop or any(lps[i] is None for i in span):
                ex.echo_error = wire.MalformedAnswer("echo answer lacks the prompt's logprobs")
                echo.append(None)
                continue
            echo.append(EchoScores(
                tuple(float(lps[i]) for i in span if lps[i] is not None),
                tuple(tops[i] if tops is not None else None for i in span)))
        ex.echo = echo

    # -- a round ----------------------------------------------------------------------------

    async def run_round(self, nodes: Sequence[NodeTarget], seed: int) -> RoundReport:
        """Verify ``nodes`` (all claiming the reference's model) with the probes of ``seed``."""
        model = self.reference.model
        wrong = [n.node_id for n in nodes if n.model != model]
        if wrong:
            raise ValueError(f"nodes {wrong} do not claim {model!r}, the reference's model")
        started = self._clock()
        probes = self.probes(seed)
        order = probes.request_order()
        exchanges = [_Exchange(n) for n in nodes]

        async def node_first_half(ex: _Exchange) -> None:
            await asyncio.gather(self._signatures(ex),
                                 self._generate(ex, order, seed),
                                 self._sample(ex, probes.sampled, seed))

        reference_answers, expected, *_ = await asyncio.gather(
            self.reference.generate([p for _, _, p in order], self.settings.max_tokens),
            self.reference.signatures(),
            *[node_first_half(ex) for ex in exchanges],
        )
        for ex in exchanges:
            self._align(ex, order, reference_answers)
        positions = {(kind, i): pos for pos, (kind, i, _) in enumerate(order)}
        canary_pos = [positions[("canary", i)] for i in range(len(probes.canary))]
        synthetic_pos = [positions[("synthetic", i)] for i in range(len(probes.synthetic))]
        identity_pos = [positions[("identity", i)] for i in range(len(probes.identity))]
        ref_canaries = [(list(reference_answers[p].prompt_ids), list(reference_answers[p].token_ids))
                        for p in canary_pos]
        reference_scores = [list(reference_answers[p].scores) for p in canary_pos]
        scorer = _CachedScorer(self.reference, reference_answers)

        # Synthetic ties need the reference's score of a node's first parting token only.
        synthetic_items = {
            (ex.target.node_id, p): (list(reference_answers[p].prompt_ids),
                                     ex.answer_ids[p][:common_prefix(
                                         reference_answers[p].token_ids, ex.answer_ids[p]) + 1])
            for ex in exchanges if ex.generation_error is None for p in synthetic_pos}
        synthetic_scores, *_ = await asyncio.gather(
            scorer.score(list(synthetic_items.values())),
            *[self._echo(ex, ref_canaries, seed) for ex in exchanges],
            *[self._replay(ex) for ex in exchanges],
        )
        by_synthetic = dict(zip(synthetic_items, synthetic_scores, strict=True))
        # Direction (a) costs the reference a forward pass per differing answer: it is only
        # computed where direction (b) has not already condemned the node.
        limits = self.thresholds()
        needs_a = [ex for ex in exchanges if ex.generation_error is None and judge_substitution(
            substitution_stats([None] * len(canary_pos), reference_scores, ex.echo, 0,
                               limits.tie_margin), limits)[0] is not Outcome.FAIL]
        canary_items = {(ex.target.node_id, p): (list(reference_answers[p].prompt_ids),
                                                 ex.answer_ids[p])
                        for ex in needs_a for p in canary_pos}
        by_canary = dict(zip(canary_items, await scorer.score(list(canary_items.values())),
                             strict=True))
        node_scores: dict[str, dict[int, list[TokenScore] | None]] = {
            ex.target.node_id: {**{p: by_synthetic.get((ex.target.node_id, p))
                                   for p in synthetic_pos},
                                **{p: by_canary.get((ex.target.node_id, p)) for p in canary_pos}}
            for ex in exchanges}

        verdicts: list[Verdict] = []
        reference_identity = reference_hashes([reference_answers[p].text for p in identity_pos])
        identity_sigs = []
        for ex in exchanges:
            if ex.generation_error is None:
                identity_sigs.append(signature_from_answers(
                    ex.target.node_id, ex.target.operator_name, ex.target.seniority,
                    [(a.text, a.token_logprobs) if a is not None else None
                     for a in (ex.answers[p] for p in identity_pos)],
                    ex.generation_latency_s))
        findings = judge_identities(identity_sigs, reference_identity,
                                    self.settings.identity_match_share)
        for ex in exchanges:
            verdicts.extend(self._signature_verdicts(ex, expected))
            verdicts.append(self._identity_verdict(ex, findings))
            verdicts.append(self._synthetic_verdict(ex, reference_answers, synthetic_pos,
                                                    node_scores[ex.target.node_id]))
            verdicts.append(self._substitution_verdict(
                ex, reference_answers, canary_pos, reference_scores,
                node_scores[ex.target.node_id]))
            if self.asks_sampled(ex.target):
                verdicts.append(self._seeded_verdict(ex))
        probes = {ex.target.node_id: _probe_state(ex) for ex in exchanges}
        verdicts = [Verdict(v.node_id, v.check, v.outcome, v.reason,
                            {**v.evidence, "model": model, "seed": seed,
                             PROBES_KEY: probes[v.node_id]}, v.traffic)
                    for v in verdicts]
        finished = self._clock()
        round_id = f"{model}:{seed}"
        flagged = sorted({v.node_id for v in verdicts if v.flagged})
        log.info("honesty.round_done round=%s nodes=%d flagged=%s seconds=%.1f", round_id,
                 len(nodes), ",".join(flagged) or "-", finished - started)
        return RoundReport(round_id, seed, model, verdicts, started, finished)

    # -- judging ----------------------------------------------------------------------------

    def _signature_verdicts(self, ex: _Exchange, expected: ExpectedSignatures) -> list[Verdict]:
        out = []
        for check, want in ((CHECK_TOKENIZER, expected.tokenizer_sha256),
                            (CHECK_CONFIG, expected.config_sha256)):
            got = ex.signatures.get(check)
            traffic = ex.traffic.get(check, Traffic())
            node = ex.target.node_id
            what = check.replace("_signature", "")
            if isinstance(got, NodeUnavailable):
                status = got.status
                reason = (f"unknown: node has no {what} signature route (HTTP {status})"
                          if status in NO_ENDPOINT_STATUSES else f"unknown: {_short(got)}")
                out.append(Verdict(node, check, Outcome.UNKNOWN, reason,
                                   {"sha256": "unknown", "expected": want}, traffic))
            elif isinstance(got, Exception) or got is None:
                out.append(Verdict(node, check, Outcome.FAIL,
                                   f"malformed {what} signature: {got}",
                                   {"sha256": "invalid", "expected": want}, traffic))
            elif want is None:
                out.append(Verdict(node, check, Outcome.UNKNOWN,
                                   "unknown: the reference has no signature to compare with",
                                   {"sha256": got, "expected": None}, traffic))
            elif got == want:
                out.append(Verdict(node, check, Outcome.PASS, f"{what} sha256 matches",
                                   {"sha256": got, "expected": want}, traffic))
            else:
                out.append(Verdict(node, check, Outcome.FAIL,
                                   f"{what} sha256 differs from the reference's",
                                   {"sha256": got, "expected": want}, traffic))
        return out

    def _generation_problem(self, ex: _Exchange, check: str) -> Verdict | None:
        err = ex.generation_error
        if err is None:
            return None
        traffic = ex.traffic.get(check, Traffic())
        if isinstance(err, wire.MalformedAnswer):
            return Verdict(ex.target.node_id, check, Outcome.FAIL,
                           f"malformed answer: {_short(err)}", {}, traffic)
        if isinstance(err, UnsupportedApi):
            return Verdict(ex.target.node_id, check, Outcome.UNKNOWN, f"unknown: {err}", {},
                           traffic)
        return Verdict(ex.target.node_id, check, Outcome.UNKNOWN,
                       f"unknown: node did not answer: {_short(err)}", {}, traffic)

    def _identity_verdict(self, ex: _Exchange, findings: Mapping[str, Any]) -> Verdict:
        problem = self._generation_problem(ex, CHECK_IDENTITY)
        if problem is not None:
            return problem
        found = findings[ex.target.node_id]
        return Verdict(ex.target.node_id, CHECK_IDENTITY, found.outcome, found.reason,
                       {**found.evidence, "threshold": self.settings.identity_match_share},
                       ex.traffic.get(CHECK_IDENTITY, Traffic()))

    def _synthetic_verdict(self, ex: _Exchange, reference_answers: Sequence[ReferenceAnswer],
                           synthetic_pos: list[int],
                           scores: Mapping[int, list[TokenScore] | None]) -> Verdict:
        traffic = ex.traffic.get(CHECK_SYNTHETIC, Traffic())
        if not synthetic_pos:
            return Verdict(ex.target.node_id, CHECK_SYNTHETIC, Outcome.UNKNOWN,
                           "unknown: no synthetic prompts configured", {}, traffic)
        problem = self._generation_problem(ex, CHECK_SYNTHETIC)
        if problem is not None:
            return problem
        items: list[SyntheticItem | None] = []
        for p in synthetic_pos:
            answer = ex.answers[p]
            items.append(None if answer is None else judge_item(
                reference_answers[p], answer.text, ex.answer_ids[p], scores[p] or [],
                self.settings.synthetic_tie_margin))
        outcome, reason, evidence = judge_synthetic(items, self.settings.synthetic_min_share)
        evidence["tie_margin"] = self.settings.synthetic_tie_margin
        return Verdict(ex.target.node_id, CHECK_SYNTHETIC, outcome, reason, evidence, traffic)

    def _substitution_verdict(self, ex: _Exchange, reference_answers: Sequence[ReferenceAnswer],
                              canary_pos: list[int], reference_scores: Sequence[list[TokenScore]],
                              scores: Mapping[int, list[TokenScore] | None]) -> Verdict:
        traffic = ex.traffic.get(CHECK_SUBSTITUTION, Traffic())
        problem = self._generation_problem(ex, CHECK_SUBSTITUTION)
        if problem is not None:
            return problem
        exact = sum(1 for p in canary_pos
                    if (answer := ex.answers[p]) is not None
                    and answer.text == reference_answers[p].text)
        stats = substitution_stats([scores[p] for p in canary_pos], reference_scores, ex.echo,
                                   exact, self.settings.tie_margin)
        outcome, reason, evidence = judge_substitution(stats, self.thresholds())
        if all(scores[p] is None for p in canary_pos):
            evidence["note_a"] = "direction (a) not computed: direction (b) already failed"
        if ex.echo_error is not None:
            evidence["echo_error"] = _short(ex.echo_error)
        return Verdict(ex.target.node_id, CHECK_SUBSTITUTION, outcome, reason, evidence, traffic)


    def _seeded_verdict(self, ex: _Exchange) -> Verdict:
        s = self.settings
        node, traffic = ex.target.node_id, ex.traffic.get(CHECK_SEEDED, Traffic())
        settings = {"temperature": s.sampled_temperature, "prompts": s.sampled_prompts}
        if ex.sampled_error is not None:
            err = ex.sampled_error
            outcome = Outcome.FAIL if isinstance(err, wire.MalformedAnswer) else Outcome.UNKNOWN
            word = "fail" if outcome is Outcome.FAIL else "unknown"
            return Verdict(node, CHECK_SEEDED, outcome,
                           f"{word}: seeded sampled request: {_short(err)}", settings, traffic)
        judgement = judge_replay(ex.replayed, max_mismatch_share=s.sampled_max_mismatch_share,
                                 min_positions=s.sampled_min_tokens)
        first = [r.first_mismatch for r in ex.replayed]
        return Verdict(node, CHECK_SEEDED, judgement.outcome, judgement.reason,
                       {**judgement.evidence(), **settings, "first_mismatch": first}, traffic)


def _probe_state(ex: _Exchange) -> ProbeState:
    """What became of the node's probes (the evasion judge reads it)."""
    err = ex.generation_error
    if err is None:
        return "answered"
    if isinstance(err, UnsupportedApi):
        return "unsupported"
    if isinstance(err, wire.MalformedAnswer):
        return "malformed"
    return "unanswered"


def new_seed() -> int:
    """An unpredictable round seed (nodes must not precompute the probes)."""
    return secrets.randbits(31)


async def record_verdicts(store: VerdictSink, report: RoundReport) -> int:
    """Write a round's verdicts (one document per check and node, replay-safe)."""
    return await store.record([v.to_record(report.round_id, report.finished_at)
                               for v in report.verdicts])


def build_references(settings: HonestySettings, http: aiohttp.ClientSession, *,
                     seed: int = 0, threads: int | None = None) -> dict[str, TrustedReference]:
    """The configured references: a Serve app by URL, else the model in process.

    ``http`` is the references' own session, never the nodes' one: a reference is the
    operator's own server (often on loopback), which the nodes' endpoint policy refuses."""
    from cluster.honesty.reference import ServeReference, TransformersReference

    out: dict[str, TrustedReference] = {}
    for model, ref in settings.references.items():
        assert ref.model_dir is not None  # the settings validator insists
        if ref.url is not None:
            out[model] = ServeReference(model, ref.url, ref.model_dir, http, seed=seed,
                                        timeout_s=settings.request_timeout_s,
                                        served_model=ref.served_model)
        else:
            out[model] = TransformersReference.load(model, ref.model_dir, threads=threads)
    return out


def _no_reference(target: NodeTarget) -> list[Verdict]:
    reason = f"unknown: no trusted reference for model {target.model!r}"
    return [Verdict(target.node_id, check, Outcome.UNKNOWN, reason,
                    {"model": target.model, PROBES_KEY: "not_sent"})
            for check in CHECKS]


def _refused(target: NodeTarget, refusal: EndpointRefusedError) -> list[Verdict]:
    """The verdicts of a node the endpoint policy refuses: nothing was sent to it."""
    reason = f"unknown: {refusal}"
    evidence = {"model": target.model, PROBES_KEY: "not_sent", "endpoint": "refused"}
    if refusal.refusal is not None:
        evidence["address_class"] = refusal.refusal.cls.value
    return [Verdict(target.node_id, check, Outcome.UNKNOWN, reason, dict(evidence))
            for check in CHECKS]


async def _refusal(guard: EndpointGuard, url: str) -> EndpointRefusedError | None:
    try:
        await guard.check_url(url)
    except EndpointRefusedError as exc:
        return exc
    return None


async def run_verification(
    settings: HonestySettings,
    nodes: Sequence[Node | NodeTarget],
    references: Mapping[str, TrustedReference],
    *,
    http: aiohttp.ClientSession | None = None,
    guard: EndpointGuard | None = None,
    seed: int | None = None,
    store: VerdictSink | None = None,
) -> list[Verdict]:
    """One round for every LLM node, grouped by claimed model; verdicts in node order.

    ``nodes`` in registration order (it sets seniority for the identity rule), operators
    from ``settings.operators``. With ``store`` the verdicts are written to MongoDB.

    ``guard``: the endpoint policy every connection to a node obeys
    (``EndpointGuard.of(settings.requester.endpoint_allowlist)``, as the Requester's;
    default: public addresses only); ``http``, when given, a session opened with it
    (:func:`~cluster.nodes.transport.open_node_session`). A node the policy refuses gets
    ``unknown`` verdicts saying why, recorded, and is sent nothing; the others' round goes on.
    """
    targets = [n if isinstance(n, NodeTarget) else NodeTarget.from_node(
        n, operator=settings.operators.get(n.node_id), seniority=float(i))
        for i, n in enumerate(nodes) if isinstance(n, NodeTarget) or n.kind == "llm"]
    round_seed = settings.seed if seed is None else seed
    round_seed = new_seed() if round_seed is None else round_seed
    guard = EndpointGuard.of() if guard is None else guard
    own_http = http is None
    session = open_node_session(guard=guard) if http is None else http
    verdicts: list[Verdict] = []
    try:
        by_model: dict[str, list[NodeTarget]] = {}
        refusals = await asyncio.gather(*(_refusal(guard, t.base_url) for t in targets))
        for target, refusal in zip(targets, refusals, strict=True):
            if refusal is None:
                by_model.setdefault(target.model, []).append(target)
                continue
            log.warning("honesty.node_refused node=%s reason=%s", target.node_id, refusal)
            refused = _refused(target, refusal)
            verdicts.extend(refused)
            if store is not None:
                round_id, now = f"{target.model}:{round_seed}", time.time()
                await store.record([v.to_record(round_id, now) for v in refused])
        for model, members in by_model.items():
            reference = references.get(model)
            if reference is None:
                for target in members:
                    verdicts.extend(_no_reference(target))
                continue
            report = await Verifier(settings, reference, session, guard=guard).run_round(
                members, round_seed)
            verdicts.extend(report.verdicts)
            if store is not None:
                await record_verdicts(store, report)
    finally:
        if own_http:
            await session.close()
    order = {t.node_id: i for i, t in enumerate(targets)}
    return sorted(verdicts, key=lambda v: order.get(v.node_id, len(order)))


@dataclass(frozen=True)
class VerifiedRound:
    """A round as the loop and ``testbench verify`` record it: its verdicts, the evasion
    verdicts judged after it, and what it sent each node."""

    verdicts: list[Verdict]
    evasion: list[VerdictRecord]
    traffic: dict[str, Traffic]
    finished_at: float


async def verify_nodes(
    settings: HonestySettings,
    stores: MongoStores,
    nodes: Sequence[Node | NodeTarget],
    references: Mapping[str, TrustedReference],
    *,
    seed: int | None = None,
    http: aiohttp.ClientSession | None = None,
    guard: EndpointGuard | None = None,
    sink: VerdictSink | None = None,
    clock: Callable[[], float] = time.time,
) -> VerifiedRound:
    """One round over ``nodes``, recorded: its verdicts (through ``sink``, default the
    verdict store), one round and its traffic per node in the traffic counters (what the
    loop's budget weighs), and the evasion verdicts it leads to. ``http`` and ``guard``:
    the nodes' session and endpoint policy (:func:`run_verification`)."""
    sink = stores.verdicts if sink is None else sink
    verdicts = await run_verification(settings, nodes, references, http=http, guard=guard,
                                      seed=seed, store=sink)
    finished = clock()
    traffic = await record_round_traffic(stores, verdicts, finished)
    evasion = await judge_round_evasion(settings, stores, verdicts, finished)
    if evasion:
        await sink.record(evasion)
    return VerifiedRound(verdicts, evasion, traffic, finished)


async def verify_registered_nodes(
    settings: HonestySettings,
    stores: MongoStores,
    references: Mapping[str, TrustedReference] | None = None,
    *,
    seed: int | None = None,
    http: aiohttp.ClientSession | None = None,
    guard: EndpointGuard | None = None,
) -> list[Verdict]:
    """One round over every enabled LLM node of the registry, recorded as the loop records
    its rounds (:func:`verify_nodes`; what ``testbench verify`` runs); ``references``
    default to the configured ones, on a session of their own (the nodes' ``http`` and
    ``guard``: :func:`run_verification`). Registry order (by id) stands in for
    registration order until nodes carry their registration time."""
    nodes = [n for n in await stores.nodes.list(enabled_only=True) if n.kind == "llm"]
    guard = EndpointGuard.of() if guard is None else guard
    session = open_node_session(guard=guard) if http is None else http
    reference_http = open_node_session() if references is None else None
    try:
        refs = references if reference_http is None else build_references(settings,
                                                                           reference_http)
        done = await verify_nodes(settings, stores, nodes, refs, seed=seed, http=session,
                                  guard=guard)
        return done.verdicts + [Verdict.from_record(r) for r in done.evasion]
    finally:
        if http is None:
            await session.close()
        if reference_http is not None:
            await reference_http.close()


async def latest_verdicts(stores: MongoStores, node_ids: Sequence[str]) -> list[Verdict]:
    """Each node's newest verdict per check, as :class:`Verdict`, in ``node_ids`` order then
    check order (the round's checks first, then evasion, receipt audits, PoC); outcomes as
    stored, unknown included. A streaming job's per-request findings are summarised by its
    ``streaming_job`` verdict and left out."""
    newest = {(r.node_id, r.check.value): r for r in await stores.verdicts.latest(node_ids)
              if r.check not in DETAIL_CHECKS}
    order = {check: i for i, check in enumerate(ROUND_CHECKS)}
    out: list[Verdict] = []
    for node_id in dict.fromkeys(node_ids):
        mine = sorted((check for n, check in newest if n == node_id),
                      key=lambda c: (order.get(c, len(order)), c))
        out.extend(Verdict.from_record(newest[(node_id, check)]) for check in mine)
    return out
