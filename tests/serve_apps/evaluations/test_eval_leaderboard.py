"""The leaderboard page in real Chromium (Debian's ``chromium``), on live measuring-loop data.

The loop's own Sampler, Requester and Evaluator measure two test nodes (one answering
right, one wrong) on openbookqa and gsm8k in three rounds an hour apart (an injected
clock), writing samples, buffer summaries and the node registry into the app's MongoDB; a
PoC verdict is recorded for each node. Headless Chromium then loads ``/leaderboard``, whose
script fetches ``/v1/leaderboard`` and draws the table and the charts; the dumped DOM must
show every node × task score the JSON holds, a pair marked unmeasurable with its reason,
and one line per node in each task's chart, and a screenshot is saved (and copied to docs/leaderboard.png when that is missing).
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from eval_app import EvalApp

from actors.evaluator import Evaluator
from actors.local import MongoRelaySink
from actors.sampler import Sampler
from cluster.core.schemas import Node, SampleRequest
from cluster.core.settings import PROJECT_ROOT, Settings
from cluster.core.verdicts import Check, Outcome, VerdictRecord
from cluster.nodes.requester import Requester
from cluster.storage.connections import StoreConnections
from cluster.testing.testnode import NodeBehaviour, TestNode

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROUNDS = 3
DOCS = {"openbookqa": 6, "gsm8k": 3}
DOCS_COPY = PROJECT_ROOT / "docs" / "leaderboard.png"


class StepClock:
    """Rounds hours apart, ending before now: the charts get a real time axis."""

    def __init__(self) -> None:
        self.now = time.time() - ROUNDS * 4 * 3600.0

    def __call__(self) -> float:
        return self.now


async def _measure(settings: Settings, nodes: list[Node], clock: StepClock) -> None:
    stores = StoreConnections(settings)
    try:
        mongo = await stores.mongo()
        await mongo.ensure_indexes()
        for node in nodes:
            await mongo.nodes.add(node)
        sampler = Sampler(settings, stores, clock=clock)
        evaluator = Evaluator(settings, stores, clock=clock)
        requester = Requester(settings.requester, MongoRelaySink(stores))
        try:
            for epoch in range(ROUNDS):
                clock.now += 3 * 3600.0
                for node in nodes:
                    for task, count in DOCS.items():
                        clock.now += 300.0  # batches minutes apart, as the loop's ticks
                        _, prompts = await sampler.sample(SampleRequest(
                            node=node, task=task, count=count, epoch=epoch, seed=7))
                        relays = await requester.relay(prompts, {node.node_id: node})
                        await evaluator.score(relays, node)
        finally:
            await requester.close()
        await mongo.verdicts.record([
            VerdictRecord(verdict_id=f"poc-{node.node_id}", node_id=node.node_id,
                          check=Check.POC, reason="test",
                          outcome=Outcome.FAIL if node.node_id.endswith("wrong") else Outcome.PASS,
                          ts=clock.now)
            for node in nodes
        ])
    finally:
        await stores.close()


@pytest.fixture(scope="module")
def measured(eval_app: EvalApp, eval_nodes: dict[str, TestNode], smollm2_dir: Path
             ) -> Iterator[list[Node]]:
    wrong = TestNode(NodeBehaviour(mode="wrong"), tokenizer_path=smollm2_dir)
    wrong_url = wrong.start_in_thread()
    nodes = [
        Node(node_id="node-right", url=eval_nodes["fast"].base_url, model="smollm2",
             tokenizer=str(smollm2_dir)),
        Node(node_id="node-wrong", url=wrong_url, model="smollm2-q2", tokenizer=str(smollm2_dir)),
    ]
    try:
        asyncio.run(_measure(eval_app.settings, nodes, StepClock()))
        yield nodes
    finally:
        wrong.stop()


STUCK_REASON = "cannot build lm-eval's completions client with tokenizer '/gone'"


async def _mark_unmeasurable(settings: Settings, reason: str | None) -> None:
    stores = StoreConnections(settings)
    try:
        buffers = (await stores.mongo()).buffers
        if reason is None:
            await buffers.clear_unmeasurable("node-wrong", "openbookqa")
        else:
            await buffers.mark_unmeasurable("node-wrong", "openbookqa", reason, 3)
    finally:
        await stores.close()


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--hide-scrollbars", "--virtual-time-budget=15000", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_leaderboard_page_renders_live_scores_and_charts_in_chromium(
    eval_app: EvalApp, measured: list[Node], tmp_path: Path
) -> None:
    asyncio.run(_mark_unmeasurable(eval_app.settings, STUCK_REASON))
    try:
        _check_page(eval_app, tmp_path)
    finally:
        asyncio.run(_mark_unmeasurable(eval_app.settings, None))


def _check_page(eval_app: EvalApp, tmp_path: Path) -> None:
    data = httpx.get(f"{eval_app.url}/v1/leaderboard", timeout=30).json()
    assert data["tasks"] == sorted(DOCS)
    assert {n["node_id"] for n in data["nodes"]} == {"node-right", "node-wrong"}
    cells = {(c["node_id"], c["task"]): c for c in data["cells"]}
    assert cells[("node-right", "gsm8k")]["mean"] == 1.0  # the right node solves gsm8k
    assert cells[("node-wrong", "gsm8k")]["mean"] == 0.0
    assert all(c["n"] == ROUNDS * DOCS[c["task"]] for c in cells.values())
    assert all(len(s["points"]) == ROUNDS * DOCS[s["task"]] for s in data["series"])
    assert [(u["node_id"], u["task"], u["reason"], u["attempts"]) for u in data["unmeasurable"]
            ] == [("node-wrong", "openbookqa", STUCK_REASON, 3)]

    page = f"{eval_app.url}/leaderboard"
    # `make test` installs Debian's chromium; without it this test must fail, not skip.
    assert Path(CHROMIUM).exists(), "chromium missing: `apt-get install -y chromium` (make test does)"
    dumped = _chromium("--dump-dom", page)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    assert 'data-state="ready"' in dom, dom[-3000:]
    # the table: a row per node, a cell per task with the JSON's mean ± stderr
    for (node_id, task), cell in cells.items():
        match = re.search(
            rf'<td class="cell" data-node="{node_id}" data-task="{task}"[^>]*>(.*?)</td>', dom)
        assert match, (node_id, task)
        text = html.unescape(re.sub(r"<[^>]+>", " ", match.group(1)))
        assert f"{cell['mean']:.4f}" in text
        stderr = "–" if cell["stderr"] is None else f"{cell['stderr']:.4f}"
        assert f"± {stderr}" in " ".join(text.split())
        assert f"n {cell['n']}" in text
    assert dom.count('class="verdict pass"') == 1 and dom.count('class="verdict fail"') == 1
    # the pair that cannot be measured says why, in its cell
    stuck = re.search(r'<div class="unmeasurable" data-node="node-wrong" '
                      r'data-task="openbookqa"[^>]*>(.*?)</div>', dom)
    assert stuck and html.unescape(stuck.group(1)) == f"cannot be measured: {STUCK_REASON}"
    # the charts: one figure per task, one line per node with all its points
    for task in DOCS:
        figure = re.search(rf'<figure class="chart" data-task="{task}">(.*?)</figure>', dom, re.S)
        assert figure, task
        lines = re.findall(r'<polyline points="([^"]+)"[^>]*data-node="([^"]+)"', figure.group(1))
        assert {node for _, node in lines} == {"node-right", "node-wrong"}
        for points, _ in lines:
            assert len(points.split()) == ROUNDS * DOCS[task]

    shot = tmp_path / "leaderboard.png"
    taken = _chromium("--window-size=1280,960", f"--screenshot={shot}", page)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    # The README's picture: written when missing or asked for, so a test run leaves the
    # tree clean (TESTBENCH_UPDATE_SCREENSHOT=1 refreshes it).
    if not DOCS_COPY.exists() or os.environ.get("TESTBENCH_UPDATE_SCREENSHOT") == "1":
        DOCS_COPY.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_COPY)
