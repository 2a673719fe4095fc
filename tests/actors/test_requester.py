"""The Requester against real test nodes over HTTP: error codes, retries, limits, timeouts."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors.requester import Requester
from cluster.config import RequesterSettings, SlaSettings
from cluster.errors import ErrorCode
from cluster.schemas import Node, Prompt, Relay
from cluster.testnode import NodeBehaviour, TestNode

MAX_RETRIES = 2


def settings(**overrides: Any) -> RequesterSettings:
    base: dict[str, Any] = {
        "global_concurrency": 16,
        "per_node_concurrency": 8,
        "max_retries": MAX_RETRIES,
        "retry_backoff_s": 0.01,
        "connect_timeout_s": 1.0,
        "sla": SlaSettings(queue_s=0.5, per_output_token_s=0.0, max_timeout_s=5.0),
    }
    base.update(overrides)
    return RequesterSettings(**base)


def make_node(node_id: str, url: str) -> Node:
    return Node.model_validate({"node_id": node_id, "url": url, "model": "smollm2"})


def make_prompt(i: int, node_id: str = "n1", body: dict[str, Any] | None = None) -> Prompt:
    key = f"{node_id}|task|{i}|0"
    return Prompt(
        prompt_id=f"{key}|0",
        sample_key=key,
        node_id=node_id,
        task="task",
        doc_id=i,
        request_index=0,
        n_requests=1,
        path="/v1/completions",
        body=body if body is not None else {"prompt": f"prompt {i}", "max_tokens": 4},
        prompt_tokens=8,
        max_output_tokens=4,
        created_at=0.0,
    )


class ListSink:
    def __init__(self) -> None:
        self.batches: list[list[Relay]] = []

    async def record_relays(self, relays: list[Relay]) -> None:
        self.batches.append(list(relays))


@pytest.fixture
async def node() -> AsyncIterator[TestNode]:
    n = TestNode(NodeBehaviour())
    await n.start()
    yield n
    await n.stop()


@pytest.fixture
async def requester() -> AsyncIterator[Requester]:
    r = Requester(settings())
    yield r
    await r.close()


async def relay_with(
    requester: Requester, node: TestNode, behaviour: NodeBehaviour, n: int = 1
) -> list[Relay]:
    node.behaviour = behaviour
    node.stats.reset()
    prompts = [make_prompt(i) for i in range(n)]
    return await requester.relay(prompts, {"n1": make_node("n1", node.base_url or "")})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- outcomes ---------------------------------------------------------------------------


async def test_a_good_answer_is_ok_with_its_response_and_timings(
    requester: Requester, node: TestNode
) -> None:
    [relay] = await relay_with(requester, node, NodeBehaviour(latency_s=0.05))
    assert relay.error_code == ErrorCode.OK
    assert relay.status == 200 and relay.error is None
    assert relay.response is not None and relay.response["choices"][0]["text"]
    assert relay.attempts == 1
    assert relay.ttft_s is not None and relay.latency_s is not None
    assert 0.05 <= relay.ttft_s <= relay.latency_s < 1.0
    assert relay.started_at <= relay.finished_at
    assert relay.prompt_id == "n1|task|0|0|0" and relay.sample_key == "n1|task|0|0"


async def test_http_500_is_a_node_error_and_not_retried(
    requester: Requester, node: TestNode
) -> None:
    [relay] = await relay_with(requester, node, NodeBehaviour(error_rate=1.0))
    assert relay.error_code == ErrorCode.NODE
    assert relay.status == 500 and relay.error is not None and "HTTP 500" in relay.error
    assert relay.attempts == 1 and node.stats.requests == 1


@pytest.mark.parametrize(
    ("behaviour", "status"),
    [(NodeBehaviour(unavailable_rate=1.0), 503), (NodeBehaviour(rate_limit_rate=1.0), 429)],
)
async def test_503_and_429_are_retried_then_reported(
    requester: Requester, node: TestNode, behaviour: NodeBehaviour, status: int
) -> None:
    [relay] = await relay_with(requester, node, behaviour)
    assert relay.error_code == ErrorCode.NODE and relay.status == status
    assert relay.attempts == MAX_RETRIES + 1
    assert node.stats.requests == MAX_RETRIES + 1


async def test_a_retry_that_succeeds_is_ok(requester: Requester, node: TestNode) -> None:
    relays = await relay_with(requester, node, NodeBehaviour(unavailable_rate=0.5, seed=1), n=40)
    retried_ok = [r for r in relays if r.error_code == ErrorCode.OK and r.attempts > 1]
    assert retried_ok, "some prompts should succeed on a retry"
    assert node.stats.requests == sum(r.attempts for r in relays)
    assert all(r.attempts <= MAX_RETRIES + 1 for r in relays)


async def test_invalid_json_is_a_node_error_and_not_retried(
    requester: Requester, node: TestNode
) -> None:
    [relay] = await relay_with(requester, node, NodeBehaviour(invalid_json_rate=1.0))
    assert relay.error_code == ErrorCode.NODE and relay.status == 200
    assert relay.error is not None and relay.error.startswith("invalid JSON body")
    assert relay.response is None and relay.attempts == 1


async def test_an_html_page_is_a_node_error(requester: Requester, node: TestNode) -> None:
    [relay] = await relay_with(requester, node, NodeBehaviour(wrong_content_type_rate=1.0))
    assert relay.error_code == ErrorCode.NODE and relay.attempts == 1
    assert relay.error is not None and "text/html" in relay.error


async def test_a_streamed_huge_body_is_cut_at_the_size_cap(node: TestNode) -> None:
    cap = 1024 * 1024
    requester = Requester(settings(response_size_cap_bytes=cap))
    try:
        t0 = time.perf_counter()
        [relay] = await relay_with(requester, node, NodeBehaviour(huge_body_rate=1.0))
        assert time.perf_counter() - t0 < 2.0  # far less than reading 64 MiB
    finally:
        await requester.close()
    assert relay.error_code == ErrorCode.NODE and relay.attempts == 1
    assert relay.error == f"response exceeded {cap} bytes"


async def test_a_declared_length_above_the_cap_is_refused(node: TestNode) -> None:
    requester = Requester(settings(response_size_cap_bytes=1024))
    try:
        node.behaviour = NodeBehaviour()
        body = {"prompt": "x" * 2000, "echo": True, "max_tokens": 1}  # ~2 KiB answer
        [relay] = await requester.relay(
            [make_prompt(0, body=body)], {"n1": make_node("n1", node.base_url or "")}
        )
    finally:
        await requester.close()
    assert relay.error_code == ErrorCode.NODE
    assert relay.error == "response exceeded 1024 bytes"


async def test_a_hang_is_cut_by_the_sla_timeout_and_not_retried(node: TestNode) -> None:
    sla = SlaSettings(queue_s=0.3, per_output_token_s=0.01, max_timeout_s=5.0)
    requester = Requester(settings(sla=sla))
    try:
        t0 = time.perf_counter()
        [relay] = await relay_with(requester, node, NodeBehaviour(hang_rate=1.0))
        elapsed = time.perf_counter() - t0
    finally:
        await requester.close()
    expected = 0.3 + 0.01 * 4 + requester._sla.ttft_s(8)
    assert relay.error_code == ErrorCode.NODE and relay.status is None
    assert relay.error is not None and "timed out" in relay.error
    assert relay.attempts == 1 and node.stats.requests == 1
    assert expected <= elapsed < expected + 1.0


async def test_connection_refused_is_retried_then_a_node_error(requester: Requester) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    [relay] = await requester.relay([make_prompt(0)], {"n1": make_node("n1", url)})
    assert relay.error_code == ErrorCode.NODE and relay.status is None
    assert relay.attempts == MAX_RETRIES + 1
    assert relay.error is not None and "before the response" in relay.error


async def test_a_dropped_connection_before_the_response_is_retried(
    requester: Requester, node: TestNode
) -> None:
    [relay] = await relay_with(requester, node, NodeBehaviour(disconnect_rate=1.0))
    assert relay.error_code == ErrorCode.NODE
    assert relay.attempts == MAX_RETRIES + 1 and node.stats.requests == MAX_RETRIES + 1


# -- one relay per prompt ---------------------------------------------------------------


async def test_every_prompt_gets_exactly_one_relay_in_order(
    requester: Requester, node: TestNode
) -> None:
    node.behaviour = NodeBehaviour(error_rate=0.2, invalid_json_rate=0.2, hang_rate=0.1, seed=5)
    nodes = {"n1": make_node("n1", node.base_url or "")}
    prompts = [make_prompt(i) for i in range(60)]
    prompts.append(make_prompt(60, node_id="ghost"))
    prompts.append(make_prompt(61, body={"prompt": "x", "bad": {1, 2}}))  # not JSON-able
    relays = await requester.relay(prompts, nodes)
    assert [r.prompt_id for r in relays] == [p.prompt_id for p in prompts]
    for r in relays:  # built without re-validation on the hot path: still valid records
        assert Relay.model_validate(r.model_dump()) == r
    codes = {r.error_code for r in relays[:60]}
    assert codes == {ErrorCode.OK, ErrorCode.NODE}
    assert relays[60].error_code == ErrorCode.BAD_PARAMS and relays[60].attempts == 0
    assert relays[61].error_code == ErrorCode.RELAY
    assert relays[61].error is not None and relays[61].error.startswith("internal error")
    stats = requester.stats()
    assert stats["relays"] == 62 and stats["in_flight"] == 0 and stats["pending"] == 0
    assert stats["by_code"]["BAD_PARAMS"] == 1 and stats["by_code"]["RELAY"] == 1
    assert sum(stats["by_code"].values()) == 62


async def test_relays_are_recorded_through_the_sink_before_returning(node: TestNode) -> None:
    sink = ListSink()
    requester = Requester(settings(), relay_sink=sink, clock=lambda: 1234.5)
    try:
        relays = await relay_with(requester, node, NodeBehaviour(), n=5)
    finally:
        await requester.close()
    assert sink.batches == [relays]
    assert all(r.started_at == r.finished_at == 1234.5 for r in relays)  # the injected clock


async def test_an_empty_batch_is_an_empty_list(requester: Requester) -> None:
    assert await requester.relay([], {}) == []


# -- limits -----------------------------------------------------------------------------


async def test_per_node_concurrency_is_respected(node: TestNode) -> None:
    requester = Requester(settings(per_node_concurrency=3, global_concurrency=50))
    try:
        relays = await relay_with(requester, node, NodeBehaviour(latency_s=0.03), n=30)
    finally:
        await requester.close()
    assert all(r.error_code == ErrorCode.OK for r in relays)
    assert node.stats.max_in_flight == 3


async def test_global_concurrency_is_respected_across_nodes(node: TestNode) -> None:
    # Three node ids on one server: the server sees the global concurrency.
    requester = Requester(settings(per_node_concurrency=10, global_concurrency=4))
    node.behaviour = NodeBehaviour(latency_s=0.03)
    node.stats.reset()
    nodes = {f"n{k}": make_node(f"n{k}", node.base_url or "") for k in range(3)}
    prompts = [make_prompt(i, node_id=f"n{i % 3}") for i in range(36)]
    try:
        relays = await requester.relay(prompts, nodes)
    finally:
        await requester.close()
    assert all(r.error_code == ErrorCode.OK for r in relays)
    assert node.stats.max_in_flight == 4


async def test_a_slow_node_does_not_hold_global_slots(node: TestNode) -> None:
    slow = TestNode(NodeBehaviour(latency_s=0.5))
    await slow.start()
    requester = Requester(settings(per_node_concurrency=2, global_concurrency=4))
    nodes = {
        "slow": make_node("slow", slow.base_url or ""),
        "fast": make_node("fast", node.base_url or ""),
    }
    node.behaviour = NodeBehaviour()
    try:
        slow_task = asyncio.create_task(
            requester.relay([make_prompt(i, node_id="slow") for i in range(4)], nodes)
        )
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        fast = await requester.relay([make_prompt(i, node_id="fast") for i in range(20)], nodes)
        fast_s = time.perf_counter() - t0
        await slow_task
    finally:
        await requester.close()
        await slow.stop()
    assert all(r.error_code == ErrorCode.OK for r in fast)
    assert fast_s < 0.4  # did not wait behind the slow node's queue
