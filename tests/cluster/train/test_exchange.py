"""The outer sync between nodes, in process: every node gathers every message; a silent peer
is reported and left behind (or ends the step when too few remain); accepted messages
survive a restart of the node, replays do not get in."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest

from cluster.auth.keys import Ed25519Key
from cluster.auth.sync_messages import SyncProblem, SyncRefused, sign_sync_message
from cluster.core.errors import NodeError
from cluster.train.config import TrainRunConfig
from cluster.train.exchange import PeerExchange, SyncFailed, send_sync_message

KEYS = [Ed25519Key(bytes([20 + i]) * 32) for i in range(3)]
URLS = [f"http://node-{i}.test" for i in range(3)]


class LoopbackSender:
    """Delivers a message straight into the receiving node's exchange (or fails like an
    unreachable node when it is absent)."""

    def __init__(self, nodes: dict[str, PeerExchange]) -> None:
        self.nodes = nodes

    async def send(self, url: str, headers: Mapping[str, str], body: bytes,
                   timeout_s: float) -> tuple[int, bytes]:
        import json

        node = self.nodes.get(url.removesuffix("/api/v1/train/sync"))
        if node is None:
            raise NodeError(f"connection refused: {url}")
        try:
            await node.receive({k.lower(): v for k, v in headers.items()}, body)
        except SyncRefused as refused:
            return refused.status, json.dumps(refused.body()).encode()
        return 200, b'{"status":"accepted"}'

    async def close(self) -> None:
        return None


def run_config(me: int, tmp: Path, n: int = 3, **kw: object) -> TrainRunConfig:
    peers = [{"public_key": KEYS[i].public_key, "url": URLS[i]} for i in range(n) if i != me]
    return TrainRunConfig.model_validate({
        "run_id": "run-x", "model": "m", "dataset": {"files": ["d.jsonl"]},
        "peers": peers, "output_dir": str(tmp / f"n{me}"), **kw})


def make_nodes(tmp: Path, alive: list[int], n: int = 3, **kw: object
               ) -> dict[str, PeerExchange]:
    """The exchanges of the ``alive`` nodes of an ``n``-node run (the others never answer)."""
    nodes: dict[str, PeerExchange] = {}
    sender = LoopbackSender(nodes)
    for i in alive:
        run = run_config(i, tmp, n, **kw)
        nodes[URLS[i]] = PeerExchange(run, KEYS[i], run.exchange_dir, sender, 1 << 20,
                                      retry_s=0.05)
    return nodes


async def test_every_node_gathers_every_nodes_message(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, [0, 1, 2])
    results = await asyncio.gather(*(n.exchange(0, f"payload-{i}".encode())
                                     for i, n in enumerate(nodes.values())))
    expected = {KEYS[i].public_key: f"payload-{i}".encode() for i in range(3)}
    assert all(r.payloads == expected and r.missing == [] for r in results)
    for node in nodes.values():
        assert {p.state for p in node.peers()} == {"ok"}
        assert all(p.last_sync_step == 0 and p.messages_sent == 1 for p in node.peers())


async def test_a_silent_peer_is_reported_and_the_step_goes_on_without_it(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, [0, 1], sync_timeout_s=0.5, min_nodes=2)
    a, b = nodes[URLS[0]], nodes[URLS[1]]
    results = await asyncio.gather(a.exchange(0, b"a0"), b.exchange(0, b"b0"))
    assert all(r.missing == [KEYS[2].public_key] for r in results)
    silent = next(p for p in a.peers() if p.public_key == KEYS[2].public_key)
    assert silent.state == "unresponsive"
    assert "no message for outer step 0 within 0.5 s" in (silent.last_error or "")
    assert "connection refused" in (silent.last_error or "")
    # the next step does not wait for it again
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(a.exchange(1, b"a1"), b.exchange(1, b"b1"))
    assert loop.time() - started < 0.4


async def test_too_few_nodes_end_the_step_with_a_clear_error(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, [0], sync_timeout_s=0.3, min_nodes=2)
    with pytest.raises(SyncFailed, match=r"outer step 0: 1 of 3 nodes took part, the run "
                                         r"needs 2 \(min_nodes\); missing: .*node-1\.test"):
        await nodes[URLS[0]].exchange(0, b"a0")


async def test_accepted_messages_survive_a_restart_and_replays_are_refused(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, [0, 1], n=2, sync_timeout_s=5)
    headers = sign_sync_message(KEYS[1], "run-x", 0, b"b0")
    sender = LoopbackSender(nodes)
    assert await send_sync_message(sender, URLS[0], headers, b"b0") == 200
    with pytest.raises(SyncRefused) as replay:
        await send_sync_message(sender, URLS[0], headers, b"b0")
    assert replay.value.problem == SyncProblem.REPLAYED and replay.value.status == 409
    # node 0 is killed and comes back on the same directory: it still holds the message
    restarted = make_nodes(tmp_path, [0], n=2, sync_timeout_s=5)[URLS[0]]
    with pytest.raises(SyncRefused, match="already holds"):
        await restarted.receive(headers, b"b0")
    result = await restarted.exchange(0, b"a0")
    assert result.payloads[KEYS[1].public_key] == b"b0"
    # once the node is past a step, a message for it is a replay too
    restarted.set_step(1)
    with pytest.raises(SyncRefused, match="behind this node's step 1"):
        await restarted.receive(sign_sync_message(KEYS[1], "run-x", 0, b"b0"), b"b0")


async def test_a_resumed_node_resends_the_payload_its_peers_may_already_hold(
    tmp_path: Path,
) -> None:
    nodes = make_nodes(tmp_path, [0, 1], n=2, sync_timeout_s=5)
    first = await asyncio.gather(nodes[URLS[0]].exchange(0, b"a0"),
                                 nodes[URLS[1]].exchange(0, b"b0"))
    assert first[0].payloads[KEYS[0].public_key] == b"a0"
    # node 0 restarts before its checkpoint and recomputes the step (say, other bits)
    again = make_nodes(tmp_path, [0], n=2, sync_timeout_s=5)
    nodes[URLS[0]] = again[URLS[0]]
    result = await nodes[URLS[0]].exchange(0, b"a0-recomputed")
    assert result.payloads[KEYS[0].public_key] == b"a0"  # what node 1 averaged


async def test_messages_go_only_to_peers_the_endpoint_policy_allows(tmp_path: Path) -> None:
    """Peers at the cloud metadata address and at a name resolving to a private service
    (127.0.0.1, not allowlisted) are sent nothing and shown refused with the reason; the
    allowlisted peer (127.0.0.2, standing in for a public address) gets our message, and
    the step goes on with it."""
    from aiohttp import web

    from cluster.core.settings import EndpointAllowlist
    from cluster.nodes.policy import EndpointGuard
    from cluster.train.exchange import HttpSyncSender

    accepted = [0]  # connections the private service accepted

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        writer.close()

    private = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    private_port = private.sockets[0].getsockname()[1]
    received: list[bytes] = []

    async def sync(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post("/api/v1/train/sync", sync)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.2", 0)
    await site.start()
    public_port = runner.addresses[0][1]

    async def lookup(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == "private.test" else ["127.0.0.2"]

    keys = [Ed25519Key(bytes([40 + i]) * 32) for i in range(4)]
    peers = [{"public_key": keys[1].public_key, "url": "http://169.254.169.254:1"},
             {"public_key": keys[2].public_key, "url": f"http://private.test:{private_port}"},
             {"public_key": keys[3].public_key, "url": f"http://127.0.0.2:{public_port}"}]
    run = TrainRunConfig.model_validate({
        "run_id": "run-x", "model": "m", "dataset": {"files": ["d.jsonl"]}, "peers": peers,
        "output_dir": str(tmp_path / "n0"), "sync_timeout_s": 1.0, "min_nodes": 2})
    guard = EndpointGuard.of(EndpointAllowlist(networks=["127.0.0.2/32"]), lookup=lookup)
    node = PeerExchange(run, keys[0], run.exchange_dir, HttpSyncSender(guard=guard), 1 << 20,
                        retry_s=0.05)
    try:
        # the allowlisted peer's own message for step 0 (it delivers like any peer)
        headers = sign_sync_message(keys[3], "run-x", 0, b"d0")
        await node.receive({k.lower(): v for k, v in headers.items()}, b"d0")
        result = await node.exchange(0, b"a0")
    finally:
        await node.close()
        await runner.cleanup()
        private.close()
        await private.wait_closed()

    assert result.payloads == {keys[0].public_key: b"a0", keys[3].public_key: b"d0"}
    assert sorted(result.missing) == sorted([keys[1].public_key, keys[2].public_key])
    status = {p.public_key: p for p in node.peers()}
    for key, said in ((keys[1], "169.254.169.254, a cloud metadata address"),
                      (keys[2], "private.test resolves to 127.0.0.1, a loopback address")):
        peer = status[key.public_key]
        assert peer.state == "refused" and peer.messages_sent == 0
        assert "not sent our message for step 0: endpoint refused: " + said in (
            peer.last_error or ""), peer.last_error
    assert accepted == [0]  # not even a connection to the private service
    assert received == [b"a0"]
    assert status[keys[3].public_key].state == "ok"
    assert status[keys[3].public_key].messages_sent == 1
