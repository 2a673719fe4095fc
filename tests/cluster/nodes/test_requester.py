"""The Requester against real test nodes over HTTP: error codes, retries, limits, timeouts."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node, Prompt, Relay
from cluster.core.settings import EndpointAllowlist, RequesterSettings, SlaSettings
from cluster.nodes.requester import Requester
from cluster.testing.testnode import NodeBehaviour, TestNode

MAX_RETRIES = 2


def settings(**overrides: Any) -> RequesterSettings:
    base: dict[str, Any] = {
        "global_concurrency": 16,
        "per_node_concurrency": 8,
        "max_retries": MAX_RETRIES,
        "retry_backoff_s": 0.01,
        "connect_timeout_s": 1.0,
        "sla": SlaSettings(queue_s=0.5, per_output_token_s=0.0, max_timeout_s=5.0),
        # the test nodes listen on loopback, which the endpoint policy refuses by default
        "endpoint_allowlist": EndpointAllowlist.loopback(),
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


async def test_an_answer_is_parsed_with_the_nodes_slot_already_free(
    node: TestNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's next request need not wait for this answer's JSON parse (a few ms for
    echoed prompt logprobs): at per-node concurrency 1 the slot is free while parsing."""
    from cluster.nodes.transport import NodeTransport

    requester = Requester(settings(per_node_concurrency=1, global_concurrency=1))
    free_at_parse: list[bool] = []
    parse = NodeTransport.parse_answer

    def parse_and_look(self: NodeTransport, received: Any) -> Any:
        free_at_parse.append(not requester._node_slot("n1").locked())
        return parse(self, received)

    monkeypatch.setattr(NodeTransport, "parse_answer", parse_and_look)
    try:
        relays = await relay_with(requester, node, NodeBehaviour(latency_s=0.01), n=4)
    finally:
        await requester.close()
    assert [r.error_code for r in relays] == [ErrorCode.OK] * 4
    assert all(r.response for r in relays)
    assert free_at_parse == [True] * 4


async def test_the_next_body_is_on_the_wire_before_an_answer_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer's parse (CPU, holding the event loop) comes after the node's next request
    has been sent: the node, in a thread of its own here, sees that request while the
    parse is still going on. Sent after the parse, a body reaches a batching node late
    and waits for its next engine step. One call per prompt, as the loop relays one call
    per doc: the next prompt waits for the node's slot."""
    from cluster.nodes.transport import NodeTransport

    server = TestNode(NodeBehaviour(latency_s=0.01))
    url = server.start_in_thread()
    requester = Requester(settings(per_node_concurrency=1, global_concurrency=4))
    parse = NodeTransport.parse_answer
    seen_while_parsing: list[bool] = []

    def slow_parse(self: NodeTransport, received: Any) -> Any:
        answered = len(seen_while_parsing) + 1
        deadline = time.monotonic() + 1.0
        while server.stats.requests <= answered and time.monotonic() < deadline:
            time.sleep(0.002)  # the node's thread runs; this event loop does not
        seen_while_parsing.append(server.stats.requests > answered)
        return parse(self, received)

    monkeypatch.setattr(NodeTransport, "parse_answer", slow_parse)
    try:
        nodes = {"n1": make_node("n1", url)}
        calls = [requester.relay([make_prompt(i)], nodes) for i in range(4)]
        relays = [r for rs in await asyncio.gather(*calls) for r in rs]
    finally:
        await requester.close()
        await server.stop()
    assert [r.error_code for r in relays] == [ErrorCode.OK] * 4
    # every answer but the last had the next request already at the node
    assert seen_while_parsing == [True, True, True, False]


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


# -- coalescing (requester.coalesce_prompts) ---------------------------------------------


class RecordingNode:
    """A completions server that records every body and answers each prompt item by name.

    ``drop_last`` answers one choice short, as a broken node batching would.
    """

    def __init__(self, latency_s: float = 0.02) -> None:
        self.latency_s = latency_s
        self.bodies: list[dict[str, Any]] = []
        self.drop_last = False
        self._runner: Any = None
        self.url = ""

    async def start(self) -> None:
        from aiohttp import web

        async def completions(request: web.Request) -> web.Response:
            body = await request.json()
            self.bodies.append(body)
            await asyncio.sleep(self.latency_s)
            prompt = body["prompt"]
            items = [prompt] if isinstance(prompt, str) else prompt
            choices = [{"text": f"answer to {item}", "index": i} for i, item in enumerate(items)]
            if self.drop_last:
                choices = choices[:-1]
            choices.reverse()  # indexes, not positions, say which prompt a choice answers
            usage = {"prompt_tokens": len(items), "completion_tokens": 2 * len(items)}
            return web.json_response({"id": "cmpl", "object": "text_completion",
                                      "choices": choices, "usage": usage})

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def recording() -> AsyncIterator[RecordingNode]:
    n = RecordingNode()
    await n.start()
    yield n
    await n.stop()


def doc_prompt(i: int, n_items: int, max_tokens: int = 4) -> Prompt:
    """A prompt whose body already holds ``n_items`` prompts (a batched multiple-choice doc)."""
    body = {"prompt": [[i, k] for k in range(n_items)], "max_tokens": max_tokens, "echo": True}
    return make_prompt(i, body=body)


async def test_coalescing_splits_each_answer_back_to_its_prompt(recording: RecordingNode) -> None:
    requester = Requester(settings(per_node_concurrency=1, coalesce_prompts=8))
    prompts = [make_prompt(i) for i in range(10)] + [doc_prompt(100 + i, 4) for i in range(5)]
    try:
        relays = await requester.relay(prompts, {"n1": make_node("n1", recording.url)})
        stats = requester.stats()
    finally:
        await requester.close()
    assert [r.prompt_id for r in relays] == [p.prompt_id for p in prompts]
    assert all(r.error_code == ErrorCode.OK and r.response is not None for r in relays)
    for p, r in zip(prompts[:10], relays[:10], strict=True):
        assert r.response is not None
        assert r.response["choices"] == [{"text": f"answer to {p.body['prompt']}", "index": 0}]
    for p, r in zip(prompts[10:], relays[10:], strict=True):
        assert r.response is not None
        # (A doc's body sent alone is passed on as the node sent it: sorted by index here,
        # as the task adapter does.)
        assert sorted(r.response["choices"], key=lambda c: c["index"]) == [
            {"text": f"answer to {item}", "index": k} for k, item in enumerate(p.body["prompt"])
        ]
        if "coalesced" in r.response:  # the node's usage counts the whole body: kept aside
            assert "usage" not in r.response and r.response["coalesced"]["usage"] is not None
    assert sum("coalesced" in r.response for r in relays if r.response) >= 8
    # 10 single prompts and 5 four-prompt docs are 30 prompt items: at most 8 per body.
    sizes = [len(b["prompt"]) if isinstance(b["prompt"], list) else 1 for b in recording.bodies]
    assert sum(sizes) == 30 and max(sizes) <= 8 and len(recording.bodies) < 15
    assert stats["bodies_coalesced"] >= 1 and stats["attempts"] == len(recording.bodies)


async def test_only_prompts_with_equal_bodies_share_one(recording: RecordingNode) -> None:
    requester = Requester(settings(per_node_concurrency=1, coalesce_prompts=16))
    prompts = [doc_prompt(i, 2, max_tokens=4 + i % 2) for i in range(12)]
    prompts.append(make_prompt(50, body={"prompt": "streamed", "max_tokens": 4, "stream": True}))
    prompts.append(make_prompt(51, body={"prompt": "twice", "max_tokens": 4, "n": 2}))
    try:
        relays = await requester.relay(prompts, {"n1": make_node("n1", recording.url)})
    finally:
        await requester.close()
    assert [r.prompt_id for r in relays] == [p.prompt_id for p in prompts]
    for body in recording.bodies:
        if body.get("stream") or body.get("n") == 2:
            assert not isinstance(body["prompt"], list)  # sent alone, as built
    mixed = [b for b in recording.bodies if isinstance(b["prompt"], list)]
    for body in mixed:  # each coalesced body holds one max_tokens's prompts only
        ids = {item[0] for item in body["prompt"]}
        assert {4 + i % 2 for i in ids} == {body["max_tokens"]}
    assert len(mixed) < 12


async def test_a_short_coalesced_answer_fails_every_prompt_in_it(
    recording: RecordingNode,
) -> None:
    recording.drop_last = True
    requester = Requester(settings(per_node_concurrency=1, coalesce_prompts=4))
    prompts = [make_prompt(i) for i in range(8)]
    try:
        relays = await requester.relay(prompts, {"n1": make_node("n1", recording.url)})
    finally:
        await requester.close()
    assert [r.prompt_id for r in relays] == [p.prompt_id for p in prompts]
    coalesced = [len(b["prompt"]) for b in recording.bodies if isinstance(b["prompt"], list)]
    assert coalesced and sum(coalesced) + len(recording.bodies) - len(coalesced) == 8
    for r in relays:
        assert r.error_code == ErrorCode.NODE and r.status == 200 and r.response is None
        assert r.error is not None and "expected 4 choices, got 3" in r.error


async def test_prompts_of_concurrent_calls_share_bodies(recording: RecordingNode) -> None:
    # The Manager relays one doc per call: coalescing must reach across calls.
    recording.latency_s = 0.1
    requester = Requester(settings(per_node_concurrency=1, coalesce_prompts=32))
    nodes = {"n1": make_node("n1", recording.url)}
    try:
        results = await asyncio.gather(
            *(requester.relay([make_prompt(i)], nodes) for i in range(20))
        )
    finally:
        await requester.close()
    assert all(r.error_code == ErrorCode.OK for [r] in results)
    for i, [r] in enumerate(results):
        assert r.response is not None
        assert r.response["choices"][0]["text"] == f"answer to prompt {i}"
    # 20 calls' prompts waited for the node's only slot: they went together, not in 20.
    assert len(recording.bodies) <= 2
    assert max(len(b["prompt"]) for b in recording.bodies if isinstance(b["prompt"], list)) >= 10


async def test_coalesced_answers_equal_uncoalesced_ones_on_the_test_node(node: TestNode) -> None:
    node.behaviour = NodeBehaviour()
    nodes = {"n1": make_node("n1", node.base_url or "")}
    prompts = [make_prompt(i, body={"prompt": f"Question: what is {i} + {i}?\nAnswer:",
                                    "max_tokens": 16, "temperature": 0.0}) for i in range(24)]
    answers = []
    for coalesce in (1, 8):
        # a generous queue SLA: this test is about answers, not timing (a loaded CI box)
        requester = Requester(settings(per_node_concurrency=2, coalesce_prompts=coalesce,
                                       sla=SlaSettings(queue_s=10.0, per_output_token_s=0.0,
                                                       max_timeout_s=30.0)))
        node.stats.reset()
        try:
            relays = await requester.relay(prompts, nodes)
        finally:
            await requester.close()
        assert all(r.error_code == ErrorCode.OK for r in relays), [
            (r.error_code, r.error) for r in relays if r.error_code != ErrorCode.OK]
        answers.append([[c["text"] for c in r.response["choices"]] for r in relays if r.response])
        if coalesce > 1:
            assert node.stats.requests < len(prompts)
    assert answers[0] == answers[1]


async def test_a_failed_coalesced_body_is_a_node_error_for_each_prompt(node: TestNode) -> None:
    requester = Requester(settings(per_node_concurrency=1, coalesce_prompts=8))
    try:
        relays = await relay_with(requester, node, NodeBehaviour(error_rate=1.0), n=12)
    finally:
        await requester.close()
    assert len(relays) == 12 and node.stats.requests < 12
    assert all(r.error_code == ErrorCode.NODE and r.status == 500 for r in relays)
    assert all(r.attempts == 1 for r in relays)  # a 500 is not retried, coalesced or not


async def test_a_cancelled_call_never_strands_another_calls_prompts(
    recording: RecordingNode,
) -> None:
    recording.latency_s = 0.3
    requester = Requester(settings(per_node_concurrency=1, coalesce_prompts=8))
    nodes = {"n1": make_node("n1", recording.url)}
    try:
        first = asyncio.create_task(requester.relay([make_prompt(0)], nodes))
        await asyncio.sleep(0.1)  # it holds the node's only slot
        a = asyncio.create_task(requester.relay([make_prompt(1)], nodes))
        await asyncio.sleep(0.01)
        b = asyncio.create_task(requester.relay([make_prompt(2)], nodes))
        assert (await first)[0].error_code == ErrorCode.OK
        await asyncio.sleep(0.1)  # a's worker now sends prompts 1 and 2 as one body
        a.cancel()
        [relay] = await asyncio.wait_for(b, timeout=2.0)
    finally:
        await requester.close()
    assert [len(b["prompt"]) if isinstance(b["prompt"], list) else 1
            for b in recording.bodies] == [1, 2]
    assert relay.error_code == ErrorCode.RELAY and "cancelled" in (relay.error or "")


async def test_a_cancelled_calls_queued_prompts_are_never_sent(recording: RecordingNode) -> None:
    recording.latency_s = 0.2
    requester = Requester(settings(per_node_concurrency=1, coalesce_prompts=8))
    nodes = {"n1": make_node("n1", recording.url)}
    try:
        first = asyncio.create_task(requester.relay([make_prompt(0)], nodes))
        await asyncio.sleep(0.05)  # it holds the node's only slot
        gone = asyncio.create_task(requester.relay([make_prompt(i) for i in (1, 2, 3)], nodes))
        await asyncio.sleep(0.05)
        gone.cancel()
        assert (await first)[0].error_code == ErrorCode.OK
        [later] = await requester.relay([make_prompt(4)], nodes)
    finally:
        await requester.close()
    assert later.error_code == ErrorCode.OK
    assert [b["prompt"] for b in recording.bodies] == ["prompt 0", "prompt 4"]
