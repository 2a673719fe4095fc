"""``testbench train start|status|stop`` reach an MLNode under the endpoint policy with the
Requester's allowlist (``requester.endpoint_allowlist``): a refused URL is sent nothing."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from cluster.cli.train import add_parser as add_train_parser
from cluster.cli.train import run as cmd_train
from cluster.core.errors import NodeError
from cluster.core.settings import EndpointAllowlist, RequesterSettings, Settings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="testbench")
    add_train_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(argv)


def test_train_commands_refuse_a_node_outside_the_endpoint_policy() -> None:
    accepted = [0]

    async def go(settings: Settings) -> None:
        async def on_connect(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
            accepted[0] += 1
            writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.to_thread(cmd_train, settings,
                                    parse(["train", "status", "--node", f"http://127.0.0.1:{port}"]))
        finally:
            server.close()
            await server.wait_closed()

    with pytest.raises(NodeError, match="127.0.0.1, a loopback address"):
        asyncio.run(go(Settings()))
    assert accepted == [0]
    with pytest.raises(NodeError, match="169.254.169.254, a cloud metadata address"):
        cmd_train(Settings(), parse(["train", "stop", "--node", "http://169.254.169.254:1"]))
    # allowlisted, the node is reached (this one hangs up: no answer)
    local = Settings(requester=RequesterSettings(endpoint_allowlist=EndpointAllowlist.loopback()))
    with pytest.raises(NodeError, match="connection error"):
        asyncio.run(go(local))
    assert accepted[0] >= 1
