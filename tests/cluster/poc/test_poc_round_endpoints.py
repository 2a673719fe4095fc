"""A PoC round obeys the endpoint policy (``requester.endpoint_allowlist``, as
``testbench poc round`` runs it): a refused node is sent nothing and its result says why,
while the other nodes of the round are reached.

127.0.0.2 (allowlisted) plays a public node; 127.0.0.1 (not allowlisted) a private service.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cluster.core.settings import EndpointAllowlist, RequesterSettings, Settings
from cluster.poc.config import PocModelParams, PocRoundParams, ValidationConfig
from cluster.poc.round import PocNodeTarget, run_poc_round
from cluster.testing.testnode import NodeBehaviour, TestNode

pytestmark = pytest.mark.usefixtures("torch_settings_restored")

SMALL = PocModelParams(dim=16, n_layers=1, n_heads=2, vocab_size=256, seq_len=4, out_dim=16)


@pytest.fixture
async def private() -> AsyncIterator[tuple[str, list[int]]]:
    """A service on 127.0.0.1 that counts the connections it accepts: (its URL, the count)."""
    accepted = [0]

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", accepted
    server.close()
    await server.wait_closed()


@pytest.fixture
async def public() -> AsyncIterator[TestNode]:
    """A node on 127.0.0.2, allowlisted (it has no PoC routes: 404)."""
    node = TestNode(NodeBehaviour(), host="127.0.0.2")
    await node.start()
    yield node
    await node.stop()


async def test_a_round_sends_nothing_to_refused_nodes_and_reaches_the_others(
    private: tuple[str, list[int]], public: TestNode,
) -> None:
    settings = Settings(requester=RequesterSettings(
        endpoint_allowlist=EndpointAllowlist(networks=["127.0.0.2/32"])))
    params = PocRoundParams(seed="s", model=SMALL, r_target=1.3, batch_size=8)
    targets = [PocNodeTarget(node_id=n, url=u, public_key="k") for n, u in (
        ("metadata", "http://169.254.169.254:1"),
        ("private", private[0]),
        ("public", public.base_url),
    )]

    results = {r.node_id: r for r in await run_poc_round(
        settings, params, ValidationConfig(), targets, 0.0, sample_seed=1, record=False)}

    for node_id, said in (("metadata", "169.254.169.254, a cloud metadata address"),
                          ("private", "127.0.0.1, a loopback address")):
        result = results[node_id]
        assert result.verdict is None and result.error is not None
        assert "endpoint refused: " + said in result.error, result.error
    assert private[1] == [0]  # not even a connection
    # the allowlisted node was reached (and has no PoC routes)
    reached = results["public"]
    assert reached.error is not None and "HTTP 404" in reached.error, reached.error
