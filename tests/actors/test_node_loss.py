"""A multi-node cluster losing the worker node that runs the Manager and its children.

The cluster (``ray.cluster_utils.Cluster``) lives in a subprocess (``node_loss_script.py``)
with a private ``RAY_TMPDIR``: this process is already the driver of the session's cluster,
and the Cluster's address file must not reach any other ``ray.init()`` on the machine. The
subprocess leads its own process group, so a hung run is killed with all its Ray processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fault_loop import fault_settings, summary_line
from fault_report import FaultTable

from cluster.core.settings import PROJECT_ROOT, PoolSettings, Settings

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "node_loss_script.py"
TARGET = 6


@pytest.mark.slow  # ~2 min here: two Ray nodes start, one dies, the loop fills its buffers
@pytest.mark.fault("worker node lost")
def test_losing_the_worker_node_of_the_loop_loses_nothing(
    fresh_settings: Settings, smollm2_dir: Path, fault_table: FaultTable, tmp_path: Path
) -> None:
    # The default layout (pools 0): the Manager's process draws and scores, so its loss
    # takes the docs being drawn and scored in it too; the fault tests of each actor
    # kind run with one Sampler and one Evaluator actor (fault_settings).
    settings = fault_settings(fresh_settings, TARGET).model_copy(update={"pools": PoolSettings()})
    # Short: Ray's unix sockets live under it, and their paths may not exceed 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="tbnl", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    log_path = tmp_path / "node_loss.log"
    try:
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), settings.model_dump_json(), str(smollm2_dir)],
                cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=540)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = log_path.read_text()
    tail = "\n".join(output.splitlines()[-40:])
    assert code == 0, f"node-loss script ended with {code}:\n{tail}"
    print("\n".join(ln for ln in output.splitlines() if ln.startswith("[")))  # its phases
    line = next(ln for ln in reversed(output.splitlines()) if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))

    worker, head = result["worker"], result["head"]
    assert result["before"]["manager"] == [worker], "the Manager did not start on the worker"
    # Children follow the Manager (ray.colocate_children), so the whole loop is lost.
    assert all(set(n) == {worker} for n in result["before"].values() if n), result["before"]
    assert not result["before"]["samplers"] and not result["before"]["evaluators"]
    assert all(set(n) == {head} for n in result["after"].values() if n), result["after"]
    assert result["after"]["manager"] == [head] and result["after"]["requester"] == [head]
    assert result["full"]
    summary = result["summary"]
    assert summary["samples"] >= 2 * TARGET
    on_worker = sum(n == worker for nodes in result["before"].values() for n in nodes)
    fault_table.record("worker node lost", (
        f"{on_worker} actors on the lost node; Manager back on the head, "
        f"{result['redriven']} samples re-driven, new samples {result['recovered_s']:.1f} s "
        f"after the loss; " + summary_line(summary, f"buffers full {result['filled_s']:.0f} s later")))
