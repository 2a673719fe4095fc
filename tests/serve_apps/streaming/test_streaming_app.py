"""The streaming app deployed on Ray Serve: signed callers in, answers with receipts out.

The upstream is the project's test node (a real HTTP server in a thread of this process,
reachable from the replica on 127.0.0.1). The app runs under its own route prefix, so the
peer-auth signatures cover the prefixed path exactly as the client addressed it.
"""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import httpx
import pytest
from ray import serve

from cluster.auth.keys import Ed25519Key
from cluster.auth.peers import RequestSigner
from cluster.auth.receipts import JobAssignment, MemoryReplayGuard, Receipt, ReceiptVerifier
from cluster.core.settings import AuthSettings
from cluster.honesty.receipt_audit import StreamingJobClient, answer_texts
from cluster.streaming import protocol as wire
from cluster.testing.testnode import NodeBehaviour, TestNode
from serve_apps.streaming import StreamingJobConfig
from serve_apps.streaming.server import build_streaming_app

APP_NAME = "jobs-test"
PREFIX = "/jobs-test"
NODE_KEY = Ed25519Key(bytes([31]) * 32)
CALLER_KEY = Ed25519Key(bytes([32]) * 32)


@pytest.fixture(scope="module")
def job_url(serve_http_port: int) -> Iterator[str]:
    node = TestNode(NodeBehaviour())
    upstream = node.start_in_thread()
    config = StreamingJobConfig(
        job_id="serve-job", upstream_url=upstream, signing_key_hex=NODE_KEY.seed_hex,
        auth=AuthSettings(keys={"caller": {"public_key": CALLER_KEY.public_key,
                                           "purposes": ["jobs"]}}))
    serve.run(build_streaming_app(config), name=APP_NAME, route_prefix=PREFIX)
    try:
        yield f"http://127.0.0.1:{serve_http_port}{PREFIX}"
    finally:
        serve.delete(APP_NAME)
        node.stop()


async def test_a_job_on_serve_signs_every_answer_for_signed_callers(job_url: str) -> None:
    assert httpx.get(f"{job_url}/job", timeout=30).status_code == 401
    signer = RequestSigner("caller", CALLER_KEY)
    assignment = JobAssignment(job_id="serve-job", node_id="n1", node_key=NODE_KEY.public_key)
    verifier = ReceiptVerifier(MemoryReplayGuard(), max_clock_skew_s=5.0)
    async with aiohttp.ClientSession(middlewares=[signer.aiohttp_middleware]) as http:
        async with http.get(f"{job_url}/job") as r:
            assert r.status == 200 and (await r.json())["node_key"] == NODE_KEY.public_key
        client = StreamingJobClient(job_url, "serve-job", http)
        for stream in (False, True):
            body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hello"}],
                    "max_tokens": 10, "temperature": 0, "stream": stream}
            ex = await client.call(wire.CHAT_COMPLETIONS, body)
            assert ex.status == 200 and ex.streamed is stream and ex.receipt_wire is not None
            await verifier.verify(Receipt.from_wire(ex.receipt_wire), assignment,
                                  input_bytes=ex.request_body, output_bytes=ex.output,
                                  request_id=ex.request_id, endpoint=ex.endpoint,
                                  sent_at=ex.sent_at, received_at=ex.received_at)
            assert answer_texts(ex.endpoint, ex.output, ex.streamed)[0]
