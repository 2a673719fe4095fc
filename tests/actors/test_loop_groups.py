"""An lm-eval group in the measuring loop: its subtasks are measured with a buffer each, and
``testbench scores`` and the leaderboard show the group, derived from those buffers exactly
as lm-eval's ``Group.aggregate`` derives it, with its subtasks folded under it.

The Manager runs as a plain class with in-process children (no Ray) on the session's
stores; the group is ``tests/support/task_sources.py``'s (a task and a nested group of two).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from task_sources import GROUP, INNER, SLICES, write_group_tasks

from actors.local import LocalPipeline
from actors.manager import Manager
from cluster.cli.scores import add_parser as add_scores_parser
from cluster.cli.scores import run as cmd_scores
from cluster.core.schemas import Node
from cluster.core.settings import EndpointAllowlist, Settings
from cluster.storage.connections import StoreConnections
from cluster.tasks.datasets import load_datasets
from cluster.tasks.registry import catalog_of, configured_groups
from cluster.testing.testnode import NodeBehaviour, TestNode
from serve_apps.evaluations.leaderboard import load_leaderboard

TARGET = 8


def _settings(base: Settings, datasets_dir: Path) -> Settings:
    return base.model_copy(update={
        "datasets_dir": datasets_dir, "tasks": [GROUP],
        "requester": base.requester.model_copy(
            update={"endpoint_allowlist": EndpointAllowlist.loopback()}),
        "manager": base.manager.model_copy(update={
            "target_samples": TARGET, "max_in_flight": 8, "tick_s": 0.05,
            "node_refresh_s": 0}),
    })


def _lm_eval_group_entries(datasets_dir: Path, rows: list[dict[str, Any]]
                           ) -> dict[str, dict[str, Any]]:
    """lm-eval's own ``Group.aggregate`` over the buffers as lm-eval task results."""
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(datasets_dir), include_defaults=False).load([GROUP])
    metrics: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry: dict[str, Any] = {"sample_len": row["n"]}
        for key, m in row["metrics"].items():
            metric, flt = key.split(",", 1)
            entry[key] = m["mean"]
            entry[f"{metric}_stderr,{flt}"] = "N/A" if m["stderr"] is None else m["stderr"]
        metrics[row["task"]] = entry
    return {name: dict(group.aggregate(metrics)) for name, group in loaded["groups"].items()}


async def test_loop_measures_a_group_as_its_subtasks_and_shows_the_group(
    fresh_settings: Settings, smollm2_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = _settings(fresh_settings, write_group_tasks(tmp_path / "datasets"))
    server = TestNode(NodeBehaviour(mode="correct"), tokenizer_path=smollm2_dir)
    url = await server.start()
    stores = StoreConnections(settings)
    manager = Manager(settings, LocalPipeline, stores=stores)
    try:
        loaded = await load_datasets(settings, [GROUP])
        assert sorted(r.task for r in loaded) == sorted(SLICES)
        mongo = await stores.mongo()
        await mongo.nodes.add(Node(node_id="n1", url=url, model="smollm2",
                                   tokenizer=str(smollm2_dir)))
        await manager.ensure_started(loop=False)
        # the group's leaves, each a (node, task) pair of its own
        assert sorted({i.task for i in manager.plan(time.time())}) == sorted(SLICES)
        deadline = time.monotonic() + 90
        while not (await manager.status())["full"]:
            assert time.monotonic() < deadline, await manager.status()
            await manager.tick()
            await asyncio.sleep(0.05)
        rows = await mongo.buffers.summaries()
        groups = configured_groups(settings.tasks, catalog_of(settings))
        board = await load_leaderboard(mongo, window=TARGET, history_s=3600.0,
                                       max_samples=1000, now=time.time(), groups=groups)
    finally:
        await manager.stop()
        await stores.close()
        await server.stop()
    assert sorted(r["task"] for r in rows) == sorted(SLICES)
    assert all(r["n"] >= TARGET for r in rows)

    parser = argparse.ArgumentParser(prog="testbench")
    add_scores_parser(parser.add_subparsers(dest="cmd"))
    capsys.readouterr()
    # the CLI runs its own event loop: off this one
    assert await asyncio.to_thread(cmd_scores, settings, parser.parse_args(["scores", "--json"])) == 0
    shown = {g["task"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    theirs = _lm_eval_group_entries(settings.datasets_dir, rows)
    for name in (GROUP, INNER):
        assert shown[name]["n"] == theirs[name]["sample_len"]
        for key, m in shown[name]["metrics"].items():
            metric, flt = key.split(",", 1)
            assert m["mean"] == theirs[name][key], (name, key)
            assert m["stderr"] == theirs[name][f"{metric}_stderr,{flt}"], (name, key)
    assert set(shown[GROUP]["metrics"]) == {"acc,none", "acc_norm,none"}

    # the table: the group, then its subtasks folded under it
    assert await asyncio.to_thread(cmd_scores, settings, parser.parse_args(["scores"])) == 0
    tasks = [line[23:40].rstrip() for line in capsys.readouterr().out.splitlines()[2:]
             if line[23:40].strip()]
    assert tasks[:5] == [GROUP, "└ tb_head", "└ tb_inner", "  └ tb_mid", "  └ tb_tail"]

    # the leaderboard: the group's cell from the same buffers, its subtasks listed under it
    assert [(g.group, g.subtasks) for g in board.groups] == [
        (GROUP, ["tb_head", INNER]), (INNER, ["tb_mid", "tb_tail"])]
    cells = {c.task: c for c in board.group_cells}
    assert cells[GROUP].metric == "acc,none"
    assert cells[GROUP].mean == theirs[GROUP]["acc,none"]
    assert cells[GROUP].stderr == theirs[GROUP]["acc_stderr,none"]
    assert sorted(board.tasks) == sorted(SLICES)
