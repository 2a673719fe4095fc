"""``testbench poc`` as the lead wires it: parser, calibration, a round with a dead node."""

from __future__ import annotations

import argparse
import socket

import pytest

from cluster.cli.poc import add_parser as add_poc_parser
from cluster.cli.poc import default_public_key
from cluster.cli.poc import run as cmd_poc
from cluster.core.settings import EndpointAllowlist, RequesterSettings, Settings

pytestmark = pytest.mark.usefixtures("torch_settings_restored")

SMALL = ["--dim", "16", "--layers", "1", "--heads", "2", "--vocab", "256", "--seq-len", "4",
         "--out-dim", "16"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="testbench")
    add_poc_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(argv)


def test_calibrate_prints_a_radius(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["poc", "calibrate", "--seed", "s", "--valid-fraction", "0.2",
                  "--nonces", "512", *SMALL])
    assert cmd_poc(Settings(), args) == 0
    out = capsys.readouterr().out
    r = float(out.split("r_target=")[1].split()[0])
    assert 0.0 < r < 2.0


def test_round_reports_an_unreachable_node_as_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = parse(["poc", "round", "--node", f"dead=http://127.0.0.1:{port}", "--r-target", "1.3",
                  "--seconds", "0", "--no-store", *SMALL])
    local = Settings(requester=RequesterSettings(endpoint_allowlist=EndpointAllowlist.loopback()))
    assert cmd_poc(local, args) == 1
    out = capsys.readouterr().out
    assert "dead" in out and "ERROR" in out


def test_bad_node_spec_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["poc", "round", "--node", "no-url-here", "--r-target", "1.3"])
    assert cmd_poc(Settings(), args) == 2
    assert "ID=VALUE" in capsys.readouterr().err
    assert default_public_key("a") != default_public_key("b")
