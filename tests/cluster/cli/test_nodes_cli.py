"""``testbench nodes add``: a tokenizer path is stored absolute, or the node is refused
with the reason (exit 2) before anything is stored."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

import pytest
from tokenizer_copies import tokenizer_copy

from cluster.cli.nodes import add_parser
from cluster.cli.nodes import run as cmd_nodes
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.storage.connections import open_mongo


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="testbench")
    add_parser(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["nodes", *argv])


def _add(settings: Settings, node_id: str, tokenizer: str) -> int:
    return cmd_nodes(settings, _parse("add", node_id, "http://127.0.0.1:9", "--model",
                                      "smollm2", "--tokenizer", tokenizer))


async def _stored(settings: Settings) -> dict[str, Node]:
    async with open_mongo(settings) as mongo:
        return {n.node_id: n for n in await mongo.nodes.list()}


def test_nodes_add_stores_a_relative_tokenizer_path_absolute(
    fresh_settings: Settings, smollm2_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tok = tokenizer_copy(smollm2_dir, tmp_path / "cli" / "tok")
    with contextlib.chdir(tmp_path / "cli"):
        assert _add(fresh_settings, "n-rel", "tok") == 0
        assert _add(fresh_settings, "n-dot", "./tok") == 0
    stored = asyncio.run(_stored(fresh_settings))
    assert stored["n-rel"].tokenizer == stored["n-dot"].tokenizer == str(tok)
    assert f"tokenizer {tok}" in capsys.readouterr().out


def test_nodes_add_refuses_a_missing_path_or_an_offline_hub_id_with_exit_2(
    fresh_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with contextlib.chdir(tmp_path):
        assert _add(fresh_settings, "n-missing", "./models/smollm2") == 2
        missing = capsys.readouterr().err
        assert _add(fresh_settings, "n-hub", "nobody/no-such-tokenizer") == 2
        hub = capsys.readouterr().err
    assert "invalid node registration" in missing
    assert f"{tmp_path}/models/smollm2 is not a directory (it does not exist)" in missing
    assert "hub is switched off (HF_HUB_OFFLINE=1)" in hub and "nobody/no-such-tokenizer" in hub
    assert asyncio.run(_stored(fresh_settings)) == {}


def test_nodes_add_applies_the_endpoint_policy_with_the_operators_allowlist(
    fresh_settings: Settings, capsys: pytest.CaptureFixture[str],
) -> None:
    """Loopback is refused (exit 2, nothing stored) until requester.endpoint_allowlist
    names it; ``fresh_settings`` allowlists loopback, so the policy's default is rebuilt."""
    from cluster.core.settings import EndpointAllowlist

    closed = fresh_settings.model_copy(update={"requester": fresh_settings.requester.model_copy(
        update={"endpoint_allowlist": EndpointAllowlist()})})
    for url in ("http://127.0.0.1:9", "http://[::ffff:127.0.0.1]:9", "http://localhost:9"):
        assert cmd_nodes(closed, _parse("add", "n-local", url, "--model", "m")) == 2
        err = capsys.readouterr().err
        assert "refused node registration" in err and "loopback address" in err, err
        assert "requester.endpoint_allowlist" in err
    assert asyncio.run(_stored(fresh_settings)) == {}
    assert cmd_nodes(fresh_settings, _parse("add", "n-local", "http://localhost:9",
                                            "--model", "m")) == 0
    assert set(asyncio.run(_stored(fresh_settings))) == {"n-local"}
