"""A pair that cannot be measured says so, costs a few attempts a minute, and ends
``--until-full`` with a non-zero exit naming it.

Two nodes are registered with ``testbench nodes add`` from a directory of the test's own
(the CLI's), with relative tokenizer paths; the loop then runs on the session's Ray, whose
workers have another working directory. node-good's path was stored absolute, so it is
measured; node-gone's tokenizer directory is removed after registration, so its openbookqa
pair cannot be built (its signature task needs no tokenizer and fills).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import time
from pathlib import Path

import pytest
import ray
from tokenizer_copies import tokenizer_copy

from actors.remote import MANAGER_NAME
from cluster.cli.loop import add_parser as add_run_parser
from cluster.cli.loop import run as cmd_run
from cluster.cli.nodes import add_parser as add_nodes_parser
from cluster.cli.nodes import run as cmd_nodes
from cluster.cli.scores import add_parser as add_scores_parser
from cluster.cli.scores import run as cmd_scores
from cluster.core.buffers import UnmeasurablePair
from cluster.core.schemas import Node
from cluster.core.settings import Settings
from cluster.storage.connections import open_mongo
from cluster.testing.testnode import NodeBehaviour, TestNode
from serve_apps.evaluations.leaderboard import load_leaderboard

TARGET = 4
BACKOFF_BASE_S, BACKOFF_MAX_S = 4.0, 15.0
# the unmeasurable pair is watched at least this long after its first failed draw
WATCH_S = 40.0
REASON = "cannot build lm-eval's completions client with tokenizer"


def _settings(base: Settings) -> Settings:
    return base.model_copy(update={
        "tasks": ["signature", "openbookqa"],
        "manager": base.manager.model_copy(update={
            "target_samples": TARGET, "task_targets": {"signature": TARGET},
            "max_in_flight": 4, "tick_s": 0.5, "backoff_base_s": BACKOFF_BASE_S,
            "backoff_max_s": BACKOFF_MAX_S, "redrive_after_s": 20.0, "node_refresh_s": 0.0}),
    })


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="testbench")
    sub = parser.add_subparsers(dest="cmd")
    for add in (add_nodes_parser, add_run_parser, add_scores_parser):
        add(sub)
    return parser.parse_args(list(argv))


def max_attempts(elapsed_s: float, base_s: float, max_s: float) -> int:
    """The most draws a pair can make in ``elapsed_s`` from its first failed one, waiting
    ``actors.planning.backoff_s`` after each (base, 2·base, 4·base... up to max)."""
    attempts, t = 1, 0.0
    while True:
        t += min(max_s, base_s * 2.0 ** (attempts - 1))
        if t > elapsed_s:
            return attempts
        attempts += 1


def _kill_manager() -> None:
    try:
        ray.kill(ray.get_actor(MANAGER_NAME, namespace="testbench"), no_restart=True)
    except ValueError:
        pass


async def _read(settings: Settings) -> tuple[dict[str, Node], list[dict], list[UnmeasurablePair]]:
    async with open_mongo(settings) as mongo:
        nodes = {n.node_id: n for n in await mongo.nodes.list()}
        return nodes, await mongo.buffers.summaries(), await mongo.buffers.unmeasurable()


async def _leaderboard_unmeasurable(settings: Settings) -> list[tuple[str, str, str]]:
    async with open_mongo(settings) as mongo:
        board = await load_leaderboard(mongo, window=TARGET, history_s=3600.0,
                                       max_samples=100, now=time.time())
    return [(u.node_id, u.task, u.reason) for u in board.unmeasurable]


def test_until_full_ends_non_zero_naming_a_pair_that_cannot_be_measured(
    fresh_settings: Settings, ray_session: None, smollm2_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = _settings(fresh_settings)
    cli_dir = tmp_path / "cli"
    tokenizer_copy(smollm2_dir, cli_dir / "tok")
    tokenizer_copy(smollm2_dir, cli_dir / "gone")
    server = TestNode(NodeBehaviour(mode="correct"), tokenizer_path=str(smollm2_dir))
    url = server.start_in_thread()
    _kill_manager()
    try:
        with contextlib.chdir(cli_dir):
            for node_id, tokenizer in (("node-good", "tok"), ("node-gone", "./gone")):
                assert cmd_nodes(settings, _parse("nodes", "add", node_id, url, "--model",
                                                  "smollm2", "--tokenizer", tokenizer)) == 0
        shutil.rmtree(cli_dir / "gone")
        nodes, _, _ = asyncio.run(_read(settings))
        assert nodes["node-good"].tokenizer == str(cli_dir / "tok")
        assert nodes["node-gone"].tokenizer == str(cli_dir / "gone")
        capsys.readouterr()

        started = time.monotonic()
        assert cmd_run(settings, _parse("run", "--until-full", "--timeout", "400")) == 1
        run_s = time.monotonic() - started
        out = capsys.readouterr()
        assert "unmeasurable pairs 1" in out.err
        assert f"error: node-gone x openbookqa cannot be measured: {REASON} " \
               f"'{cli_dir / 'gone'}': no such directory on" in out.err, out.err[-3000:]
        assert "timed out" not in out.err
        assert "cannot be measured as configured" in out.out and REASON in out.out

        # the backoff: attempts over the time since the first failed draw stay within
        # what backoff_s allows, a few a minute (the pair is watched at least WATCH_S)
        _, _, marks = asyncio.run(_read(settings))
        [mark] = marks
        time.sleep(max(0.0, mark.since + WATCH_S - time.time()))
        manager = ray.get_actor(MANAGER_NAME, namespace="testbench")
        status = ray.get(manager.status.remote(detail=False))
        watched_s = time.time() - mark.since
        attempts = status["unmeasurable"]
        bound = max_attempts(watched_s, BACKOFF_BASE_S, BACKOFF_MAX_S) + 1
        with capsys.disabled():
            print(f"\nuntil-full ended in {run_s:.1f}s; node-gone x openbookqa: {attempts} "
                  f"attempts in {watched_s:.0f}s ({60 * attempts / watched_s:.1f}/min, "
                  f"bound {bound})\n{out.err}{out.out}")
        assert 1 <= attempts <= bound
        assert 60 * attempts / watched_s <= 10
        assert status["pipeline_errors"] == 0

        # `testbench scores` (table and JSON) and the leaderboard show the pair and why
        assert cmd_scores(settings, _parse("scores")) == 0
        table = capsys.readouterr().out
        [line] = [ln for ln in table.splitlines() if ln.startswith("node-gone ")
                  and "openbookqa" in ln]
        assert REASON in line
        assert cmd_scores(settings, _parse("scores", "--json")) == 0
        [stuck] = json.loads(capsys.readouterr().out)["unmeasurable"]
        assert (stuck["node_id"], stuck["task"]) == ("node-gone", "openbookqa")
        assert 1 <= stuck["attempts"] <= attempts and REASON in stuck["reason"]
        assert asyncio.run(_leaderboard_unmeasurable(settings)) == [
            ("node-gone", "openbookqa", stuck["reason"])]

        # everything measurable filled: node-good on both tasks, node-gone's signature
        _, summaries, _ = asyncio.run(_read(settings))
        filled = {(s["node_id"], s["task"]): s["n"] for s in summaries}
        assert filled == {("node-good", "signature"): TARGET,
                          ("node-good", "openbookqa"): TARGET,
                          ("node-gone", "signature"): TARGET}
    finally:
        _kill_manager()
        server.stop()
