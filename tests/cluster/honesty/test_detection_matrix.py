"""The detection matrix (issue 4): the honest node and every cheater of the zoo through
signatures, identity, synthetic jobs and the substitution check, over 20 seeded rounds.

One zoo process serves every node (SmolLM2 in transformers, float32, CPU). The trusted
reference is a zoo node of its own (kind ``honest``) reached over HTTP through
:class:`ServeReference`, the production code path; it shares the honest node's loaded
model and answer cache, so in this test the reference costs no extra compute (its answers
are the ones the honest node computes anyway, bit for bit, as an in-process reference's
would be: ``test_reference_implementations_agree``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from cluster.core.settings import HonestySettings
from cluster.honesty.probes import build_probes
from cluster.honesty.reference import ServeReference, TransformersReference
from cluster.honesty.traffic import verification_traffic
from cluster.honesty.verdicts import CHECKS, Outcome, Verdict
from cluster.honesty.verification import NodeTarget, Verifier, record_verdicts
from cluster.storage.mongo import MongoStores
from cluster.testing.zoo import ZooProcess
from cluster.reports.honesty import format_verdicts

log = logging.getLogger(__name__)

MODEL = "smollm2"
ROUNDS = 20
CHEATERS = ("perturbed", "quantized", "proxy", "lazy", "random")
# Registration order: the honest node first (the proxy registers after its backend).
NODES = ("honest", *CHEATERS)
ZOO_NODES = ("reference=honest", "honest", "perturbed", "quantized", "proxy@honest", "lazy",
             "random")


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
def reference(zoo: dict[str, str], smollm2_dir: Path, http: aiohttp.ClientSession
              ) -> ServeReference:
    return ServeReference(MODEL, zoo["reference"], smollm2_dir, http, seed=0)


def targets(zoo: dict[str, str]) -> list[NodeTarget]:
    return [NodeTarget(name, zoo[name], MODEL, seniority=i) for i, name in enumerate(NODES)]


async def test_every_cheater_is_flagged_in_every_round_and_the_honest_node_never(
    zoo: dict[str, str], reference: ServeReference, http: aiohttp.ClientSession,
    mongo: MongoStores,
) -> None:
    settings = HonestySettings()  # the defaults are what is calibrated and shipped
    verifier = Verifier(settings, reference, http)
    started = time.monotonic()
    flagged_by: dict[str, list[set[str]]] = {name: [] for name in NODES}
    unknown: list[Verdict] = []
    recorded = 0
    first_verdicts: list[Verdict] = []
    for seed in range(1, ROUNDS + 1):
        report = await verifier.run_round(targets(zoo), seed)
        recorded += await record_verdicts(mongo.verdicts, report)
        first_verdicts = first_verdicts or report.verdicts
        for name in NODES:
            mine = [v for v in report.verdicts if v.node_id == name]
            assert sorted(v.check for v in mine) == sorted(CHECKS)
            flagged_by[name].append({v.check for v in mine if v.flagged})
        unknown += [v for v in report.verdicts if v.outcome is Outcome.UNKNOWN]
    elapsed = time.monotonic() - started
    log.warning("detection_matrix rounds=%d seconds=%.1f\n%s", ROUNDS, elapsed,
                "\n".join(f"{n:10s} " + " ".join(",".join(sorted(f)) or "-" for f in rounds)
                          for n, rounds in flagged_by.items()))
    log.warning("verdicts of round 1:\n%s", format_verdicts(first_verdicts))

    assert all(not flags for flags in flagged_by["honest"]), flagged_by["honest"]
    for cheater in CHEATERS:
        missed = [i + 1 for i, flags in enumerate(flagged_by[cheater]) if not flags]
        assert not missed, f"{cheater} escaped in rounds {missed}"
    # The proxy is caught by identity alone (it relays honest answers); lazy nodes have no
    # signature routes (unknown, not a failure); nothing else is unknown.
    assert all("identity" in flags for flags in flagged_by["proxy"])
    assert {(v.node_id, v.check) for v in unknown} <= {
        (lazy, check) for lazy in ("lazy", "random")
        for check in ("tokenizer_signature", "config_signature")}

    # Verdicts are in MongoDB with their evidence and the traffic they cost.
    assert recorded == ROUNDS * len(NODES) * len(CHECKS)
    stored = await mongo.verdicts.for_node("proxy", "identity")
    assert len(stored) == ROUNDS and all(r.verdict == "fail" for r in stored)
    assert stored[0].evidence["duplicate_of"] == "honest"
    spent = await verification_traffic(mongo, "honest", since_ts=0.0)
    assert spent.requests == pytest.approx(ROUNDS * 4)  # 2 signature GETs, 1 batch, 1 echo
    assert spent.completion_tokens > 0


async def test_reference_implementations_agree(
    reference: ServeReference, smollm2_dir: Path
) -> None:
    """The in-process transformers reference and the reference over HTTP give the same
    greedy answers and (up to float noise of another batch shape) the same logprobs."""
    s = HonestySettings()
    local = TransformersReference.load(MODEL, smollm2_dir, threads=1)
    probes = build_probes(7, identity=s.identity_prompts, identity_words=s.identity_words,
                          synthetic=s.synthetic_prompts, canary=s.canary_prompts)
    prompts = [p for _, _, p in probes.request_order()]
    remote_answers = await reference.generate(prompts, 16)
    local_answers = await local.generate(prompts, 16)
    assert [a.text for a in remote_answers] == [a.text for a in local_answers]
    assert [a.token_ids for a in remote_answers] == [a.token_ids for a in local_answers]
    for remote, own in zip(remote_answers, local_answers, strict=True):
        for r, o in zip(remote.scores, own.scores, strict=True):
            assert abs(r.logprob - o.logprob) < 1e-4
    # teacher-forced scores of the reference's own answers equal its generation logprobs
    items = [(list(a.prompt_ids), list(a.token_ids)) for a in local_answers[:3]]
    for forced, answer in zip(await local.logprobs(items), local_answers[:3], strict=True):
        assert len(forced) == len(answer.scores)
        assert all(abs(f.logprob - a.logprob) < 1e-4 for f, a in zip(forced, answer.scores,
                                                                      strict=True))
    assert (await local.signatures()) == (await reference.signatures())
