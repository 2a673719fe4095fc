"""Streaming organic jobs through real HTTP: the streaming app (uvicorn) in front of test nodes,
receipts on every answer, audits that re-run samples on a reference node."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from honesty_servers import AppServer

from cluster.auth.keys import Ed25519Key
from cluster.auth.receipts import (
    JobAssignment,
    MemoryReplayGuard,
    Receipt,
    ReceiptVerifier,
)
from cluster.core.errors import RegistrationError
from cluster.core.settings import AuthSettings, ReceiptSettings
from cluster.honesty.receipt_audit import (
    AuditReport,
    JobAuditor,
    JobExchange,
    OpenAIReference,
    StreamingJobClient,
    answer_texts,
)
from cluster.storage.mongo import MongoStores
from cluster.streaming import protocol as wire
from cluster.testing.testnode import TestNode
from serve_apps.streaming import StreamingJobConfig
from serve_apps.streaming.routes import create_api
from serve_apps.streaming.serving import StreamingServing

NODE_KEY = Ed25519Key(bytes([21]) * 32)
IMPOSTOR_KEY = Ed25519Key(bytes([22]) * 32)
ALL = ReceiptSettings(rerun_fraction=1.0, max_clock_skew_s=5.0)


def job_server(upstream: str, job_id: str, key: Ed25519Key = NODE_KEY,
               **config: Any) -> AppServer:
    cfg = StreamingJobConfig(job_id=job_id, upstream_url=upstream, signing_key_hex=key.seed_hex,
                        **config)
    server = AppServer(create_api(StreamingServing(cfg, key), cfg.auth))
    server.start()
    return server


@pytest.fixture(scope="module")
def honest_job(honest_node: TestNode) -> Iterator[str]:
    assert honest_node.base_url is not None
    server = job_server(honest_node.base_url, "job-honest", models=["smollm2"])
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def cheating_job(cheating_node: TestNode) -> Iterator[str]:
    assert cheating_node.base_url is not None
    server = job_server(cheating_node.base_url, "job-cheat")
    yield server.url
    server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def requests_mix(n: int) -> list[tuple[str, dict[str, Any]]]:
    """Completions and chat, streamed and not, mostly at temperature 0."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        stream = i % 2 == 1
        temperature = 0.7 if i % 5 == 4 else 0
        if i % 4 < 2:
            out.append((wire.COMPLETIONS, {"model": "smollm2", "prompt": f"Tell me about {i}",
                                           "max_tokens": 12, "temperature": temperature,
                                           "stream": stream}))
        else:
            out.append((wire.CHAT_COMPLETIONS, {
                "model": "smollm2", "messages": [{"role": "user", "content": f"Count to {i}"}],
                "max_tokens": 12, "temperature": temperature, "stream": stream}))
    return out


async def run_job(url: str, job_id: str, http: aiohttp.ClientSession, n: int) -> list[JobExchange]:
    client = StreamingJobClient(url, job_id, http)
    return [await client.call(endpoint, body) for endpoint, body in requests_mix(n)]


def auditor(mongo: MongoStores, reference: TestNode, http: aiohttp.ClientSession,
            settings: ReceiptSettings = ALL, seed: int = 7) -> JobAuditor:
    assert reference.base_url is not None
    return JobAuditor(ReceiptVerifier(mongo.receipts, settings.max_clock_skew_s),
                      OpenAIReference(reference.base_url, http), mongo.verdicts, settings,
                      random.Random(seed))


async def test_every_answer_of_an_honest_job_carries_a_valid_receipt(
    honest_job: str, http: aiohttp.ClientSession,
) -> None:
    exchanges = await run_job(honest_job, "job-honest", http, 8)
    assignment = JobAssignment(job_id="job-honest", node_id="node-h", node_key=NODE_KEY.public_key)
    verifier = ReceiptVerifier(MemoryReplayGuard(), 5.0)
    for ex in exchanges:
        assert ex.status == 200 and ex.receipt_wire is not None
        receipt = await verifier.verify(
            Receipt.from_wire(ex.receipt_wire), assignment, input_bytes=ex.request_body,
            output_bytes=ex.output, request_id=ex.request_id, endpoint=ex.endpoint,
            sent_at=ex.sent_at, received_at=ex.received_at)
        assert receipt.ts_from_ms <= receipt.ts_to_ms
        texts = answer_texts(ex.endpoint, ex.output, ex.streamed)
        assert len(texts) == 1 and texts[0].strip()
    streamed = [ex for ex in exchanges if ex.streamed]
    assert len(streamed) == 4
    assert all(ex.output.endswith(b"data: [DONE]\n\n") for ex in streamed)
    # the job says which key its receipts are signed with
    info = httpx.get(f"{honest_job}/job", timeout=10).json()
    assert info["node_key"] == NODE_KEY.public_key and info["job_id"] == "job-honest"


def test_standard_openai_clients_read_the_job_unchanged(honest_job: str) -> None:
    client = openai.OpenAI(base_url=f"{honest_job}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    whole = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        temperature=0)
    assert streamed == whole.parse().choices[0].message.content
    assert Receipt.from_wire(whole.headers[wire.HEADER_RECEIPT]).node_key == NODE_KEY.public_key


async def test_an_honest_job_passes_its_audit(
    honest_job: str, honest_node: TestNode, reference_node: TestNode,
    http: aiohttp.ClientSession, mongo: MongoStores,
) -> None:
    exchanges = await run_job(honest_job, "job-honest", http, 10)
    assignment = JobAssignment(job_id="job-honest", node_id="node-h", node_key=NODE_KEY.public_key)
    report = await auditor(mongo, reference_node, http).audit(assignment, exchanges)
    assert report.passed, report.verdicts
    assert (report.receipts_valid, report.eligible, report.rerun, report.mismatches) == (10, 8, 8, 0)
    stored = await mongo.verdicts.for_node("node-h")
    assert [(v.check, v.outcome) for v in stored] == [("streaming_job", "pass")]
    assert stored[0].evidence["rerun"] == 8


async def test_a_node_serving_another_model_is_caught_by_the_reruns(
    cheating_job: str, reference_node: TestNode, http: aiohttp.ClientSession, mongo: MongoStores,
) -> None:
    exchanges = await run_job(cheating_job, "job-cheat", http, 10)
    assignment = JobAssignment(job_id="job-cheat", node_id="node-c", node_key=NODE_KEY.public_key)
    report = await auditor(mongo, reference_node, http).audit(assignment, exchanges)
    # its receipts are genuine: signing cannot tell which model wrote the answer
    assert report.receipts_valid == 10 and report.receipts_refused == 0
    assert not report.passed and report.mismatches == report.rerun == 8
    stored = await mongo.verdicts.for_node("node-c", check="rerun")
    assert len(stored) == 8 and {v.reason for v in stored} == {"answer_differs"}
    evidence = stored[0].evidence
    assert evidence["node_answer"] != evidence["reference_answer"]
    assert evidence["job_id"] == "job-cheat" and len(evidence["input_sha256"]) == 64
    summary = await mongo.verdicts.for_node("node-c", check="streaming_job")
    assert [v.outcome for v in summary] == ["fail"]


async def test_a_sample_is_rerun_at_the_configured_fraction(
    cheating_job: str, reference_node: TestNode, http: aiohttp.ClientSession, mongo: MongoStores,
) -> None:
    exchanges = await run_job(cheating_job, "job-cheat", http, 20)
    assignment = JobAssignment(job_id="job-cheat", node_id="node-s", node_key=NODE_KEY.public_key)
    settings = ReceiptSettings(rerun_fraction=0.2, rerun_min=1)
    report = await auditor(mongo, reference_node, http, settings).audit(assignment, exchanges)
    assert report.eligible == 16 and report.rerun == 4 == report.mismatches


async def test_receipts_of_another_key_or_replayed_are_verdicts(
    honest_node: TestNode, reference_node: TestNode, honest_job: str,
    http: aiohttp.ClientSession, mongo: MongoStores,
) -> None:
    assert honest_node.base_url is not None
    impostor = job_server(honest_node.base_url, "job-honest", IMPOSTOR_KEY)
    try:
        exchanges = await run_job(impostor.url, "job-honest", http, 3)
    finally:
        impostor.stop()
    assignment = JobAssignment(job_id="job-honest", node_id="node-i", node_key=NODE_KEY.public_key)
    report: AuditReport = await auditor(mongo, reference_node, http).audit(assignment, exchanges)
    assert report.receipts_refused == 3 and report.rerun == 0
    assert {v.reason for v in await mongo.verdicts.for_node("node-i", "receipt")} == {"wrong_key"}

    genuine = await run_job(honest_job, "job-honest", http, 3)
    assignment = JobAssignment(job_id="job-honest", node_id="node-r", node_key=NODE_KEY.public_key)
    first = await auditor(mongo, reference_node, http).audit(assignment, genuine)
    assert first.passed
    # the same exchanges presented again (a node billing twice): every receipt is a replay
    again = await auditor(mongo, reference_node, http).audit(assignment, genuine)
    assert again.receipts_refused == 3
    assert {v.reason for v in await mongo.verdicts.for_node("node-r", "receipt")} == {"replayed"}


async def test_an_audit_of_no_answered_exchange_is_unknown_not_a_pass(
    reference_node: TestNode, http: aiohttp.ClientSession, mongo: MongoStores,
) -> None:
    failed = JobExchange(job_id="job-down", request_id="r1", endpoint=wire.COMPLETIONS,
                         request_body=b"{}", status=502, output=b"", streamed=False,
                         receipt_wire=None, sent_at=1.0, received_at=2.0)
    assignment = JobAssignment(job_id="job-down", node_id="node-d", node_key=NODE_KEY.public_key)
    report = await auditor(mongo, reference_node, http).audit(assignment, [failed])
    assert report.not_ok == 1 and not report.passed
    [stored] = await mongo.verdicts.for_node("node-d")
    assert (stored.check, stored.outcome) == ("streaming_job", "unknown")


async def test_the_wrapper_refuses_what_it_cannot_sign(
    honest_job: str, http: aiohttp.ClientSession,
) -> None:
    r = httpx.post(f"{honest_job}/v1/completions", timeout=10,
                   json={"model": "gpt-9", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert wire.HEADER_RECEIPT not in r.headers
    r = httpx.post(f"{honest_job}/v1/completions", content=b"not json", timeout=10)
    assert r.status_code == 400
    r = httpx.post(f"{honest_job}/v1/completions", timeout=10,
                   headers={wire.HEADER_REQUEST_ID: "bad id with spaces"},
                   json={"model": "smollm2", "prompt": "x"})
    assert r.status_code == 400
    # the upstream's own refusals pass through, unsigned
    r = httpx.post(f"{honest_job}/v1/completions", timeout=10,
                   json={"model": "smollm2", "prompt": "x", "n": 3})
    assert r.status_code == 400 and wire.HEADER_RECEIPT not in r.headers
    down = job_server("http://127.0.0.1:9", "job-down")
    try:
        r = httpx.post(f"{down.url}/v1/completions", timeout=10, json={"prompt": "x"})
        assert r.status_code == 502 and wire.HEADER_RECEIPT not in r.headers
    finally:
        down.stop()


def test_job_routes_can_require_signed_callers(honest_node: TestNode) -> None:
    from cluster.auth.peers import RequestSigner

    client_key = Ed25519Key(bytes([23]) * 32)
    assert honest_node.base_url is not None
    server = job_server(honest_node.base_url, "job-private", auth=AuthSettings(
        keys={"user-1": {"public_key": client_key.public_key, "purposes": ["jobs"]}}))
    body = {"model": "smollm2", "prompt": "x", "max_tokens": 4, "temperature": 0}
    try:
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=10)
        assert r.status_code == 401
        with httpx.Client(auth=RequestSigner("user-1", client_key).httpx_auth, timeout=10) as c:
            r = c.post(f"{server.url}/v1/completions", json=body)
        assert r.status_code == 200 and wire.HEADER_RECEIPT in r.headers
    finally:
        server.stop()


def test_the_cli_registers_a_job_and_audits_it_on_demand(
    honest_job: str, reference_node: TestNode, mongo_url: str, smollm2_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``testbench receipts register|list|audit``: the job's key is read from its app, and
    an audit sends fresh requests through the app, as the loop does on schedule."""
    from cluster.cli.main import build_parser
    from cluster.cli.receipts import run as cmd_receipts
    from cluster.core.schemas import Node
    from cluster.core.settings import (
        EndpointAllowlist,
        ReferenceSettings,
        RequesterSettings,
        Settings,
        StoreSettings,
    )

    assert reference_node.base_url is not None
    settings = Settings(stores=StoreSettings(mongo_url=mongo_url,
                                             mongo_database=f"r_{uuid.uuid4().hex[:10]}"),
                        # the job's app is on loopback, which the endpoint policy refuses
                        requester=RequesterSettings(
                            endpoint_allowlist=EndpointAllowlist.loopback()))
    settings.honesty.references = {"smollm2": ReferenceSettings(
        url=reference_node.base_url, model_dir=smollm2_dir)}
    settings.receipts.rerun_fraction = 1.0
    settings.receipts.audit_sampled_requests = 0  # the test node cannot sample seeded

    async def add_node() -> None:
        stores = await MongoStores.connect(mongo_url, settings.stores.mongo_database)
        await stores.nodes.add(Node(node_id="node-cli", url=honest_job, model="smollm2"))
        await stores.close()

    asyncio.run(add_node())

    def cli(*argv: str) -> tuple[int, str]:
        code = cmd_receipts(settings, build_parser().parse_args(["receipts", *argv]))
        return code, capsys.readouterr().out

    code, out = cli("register", "job-honest", "--node", "node-cli", "--url", honest_job)
    assert code == 0 and NODE_KEY.public_key[:16] in out
    with pytest.raises(RegistrationError, match="serves job 'job-honest', not 'job-other'"):
        cli("register", "job-other", "--node", "node-cli", "--url", honest_job)
    code, out = cli("audit", "--json")
    assert code == 0, out
    (audit,) = json.loads(out)
    assert audit["job"]["job_id"] == "job-honest" and audit["report"]["outcome"] == "pass"
    assert audit["report"]["receipts_valid"] == 4 and audit["report"]["rerun"] == 4
    assert audit["report"]["mismatches"] == 0
    code, out = cli("list")
    assert code == 0 and "job-honest" in out and "never" not in out
