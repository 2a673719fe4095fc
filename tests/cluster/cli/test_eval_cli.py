"""``testbench eval``: on the API (``--server``) and in process, lm-eval's table and JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from eval_app import TENANTS, EvalApp

from cluster.cli.evaluations import add_parser as add_eval_parser
from cluster.cli.evaluations import parse_gen_kwargs
from cluster.cli.evaluations import run as cmd_eval
from cluster.testing.testnode import TestNode

pytestmark = pytest.mark.slow


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="testbench")
    add_eval_parser(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["eval", *argv])


def _argv(node: TestNode, tokenizer: Path, output: Path, *extra: str) -> list[str]:
    return ["--endpoint", f"{node.base_url}/v1/completions", "--model", "smollm2",
            "--tokenizer", str(tokenizer), "--tasks", "openbookqa,gsm8k", "--limit", "3",
            "--output", str(output), *extra]


def _table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("|") and "---" not in line]


def test_eval_on_the_server_prints_lm_evals_table_and_writes_its_json(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "results.json"
    args = _parse(*_argv(eval_nodes["fast"], smollm2_dir, output, "--server", eval_app.url,
                         "--token", TENANTS["alice"], "--samples"))
    assert cmd_eval(eval_app.settings, args) == 0
    captured = capsys.readouterr()
    rows = _table_rows(captured.out)
    assert rows[0] == ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "",
                       "Stderr"]
    assert [r[0] for r in rows[1:] if r[0]] == ["gsm8k", "openbookqa"]
    gsm8k = next(r for r in rows if r[0] == "gsm8k")
    assert gsm8k[3] == "5" and gsm8k[6] == "1.0000"
    assert "submitted evaluation" in captured.err and "3/3" in captured.err
    results = json.loads(output.read_text())
    assert results["n-samples"]["gsm8k"] == {"original": 1319, "effective": 3}
    assert len(results["samples"]["gsm8k"]) == 3 * 2  # two filters per doc


def test_eval_in_process_gives_the_same_results_as_on_the_server(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    local, remote = tmp_path / "local.json", tmp_path / "remote.json"
    assert cmd_eval(eval_app.settings, _parse(
        *_argv(eval_nodes["fast"], smollm2_dir, local, "--no-progress"))) == 0
    assert cmd_eval(eval_app.settings, _parse(
        *_argv(eval_nodes["fast"], smollm2_dir, remote, "--no-progress", "--server",
               eval_app.url, "--token", TENANTS["bob"]))) == 0
    ours, theirs = json.loads(local.read_text()), json.loads(remote.read_text())
    assert ours["results"] == theirs["results"]
    tables = capsys.readouterr().out.split("\n\n")
    assert _table_rows(tables[0]) == _table_rows(tables[1])


def test_eval_refuses_bad_input_before_running(
    eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "x.json"
    assert cmd_eval(eval_app.settings, _parse(
        *_argv(eval_nodes["fast"], smollm2_dir, out, "--limit", "0"))) == 2
    assert "limit" in capsys.readouterr().err
    assert cmd_eval(eval_app.settings, _parse(
        *_argv(eval_nodes["fast"], smollm2_dir, out, "--server", eval_app.url,
               "--token", "wrong-token-0123456789"))) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert not out.exists()


def test_gen_kwargs_take_lm_evals_syntax_or_json() -> None:
    assert parse_gen_kwargs("temperature=0,max_gen_toks=64,do_sample=False,until=Q:") == {
        "temperature": 0, "max_gen_toks": 64, "do_sample": False, "until": "Q:"}
    assert parse_gen_kwargs('{"until": ["a", "b"]}') == {"until": ["a", "b"]}
    assert parse_gen_kwargs(None) == {}
