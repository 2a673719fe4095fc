"""``ray job submit`` against a running cluster: the loop runs as a Ray job and measures.

A separate Ray head is started here the way an operator would (``ray start --head``, with
the dashboard, which serves the job API), the loop is submitted with the job client
exactly as ``ray job submit --working-dir . -- python -m cluster run ...`` would, and the
job must succeed, log its progress and leave samples in MongoDB. The head also shows the
named, detached Manager through the state API (what the dashboard's actor page lists).

The head runs with ``--block`` in a process group of its own and a private temp dir:
stopping it kills exactly its processes (``ray stop`` would stop every Ray on the machine),
and its address file stays out of the way of any other ``ray.init()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors

from actors.remote import MANAGER_NAME
from cluster.core.schemas import Node
from cluster.core.settings import PROJECT_ROOT, Settings, StoreSettings
from cluster.local.embedded import free_port
from cluster.storage.connections import StoreConnections
from cluster.testing.testnode import NodeBehaviour, TestNode

# What the upload leaves out: the venv and model cache (GBs), local data, vendored CRDs.
EXCLUDES = [".venv", ".cache", "data", "infra/kuberay/crds", ".git"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class RayHead:
    dashboard_url: str
    address: str


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[RayHead]:
    temp_dir = tempfile.mkdtemp(prefix="tbj", dir="/tmp")  # short: unix socket paths
    gcs, dashboard = free_port(), free_port()
    ports = {
        "--port": gcs, "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(), "--ray-client-server-port": free_port(),
        "--runtime-env-agent-port": free_port(), "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": "disabled",
            # the job's `python` must be this venv's, as on a cluster image
            "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"}
    cmd = [str(venv_bin / "ray"), "start", "--head", "--block", "--num-cpus=4",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", f"--object-store-memory={200 * 1024 * 1024}",
           *(f"{flag}={port}" for flag, port in ports.items())]
    log_path = tmp_path / "ray_head.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"ray start exited:\n{log_path.read_text()[-3000:]}"
            with contextlib.suppress(Exception):
                JobSubmissionClient(url).list_jobs()
                break
            assert time.monotonic() < deadline, f"no job API:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        yield RayHead(dashboard_url=url, address=f"127.0.0.1:{gcs}")
    finally:
        stop_process_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the head's whole process group (``ray start --block`` and the Ray
    processes it started, all at once), SIGKILL to whatever is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        proc.poll()  # reap it, or the zombie keeps the group alive
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def job_node(smollm2_dir: Path) -> Iterator[Node]:
    server = TestNode(NodeBehaviour(mode="correct"), tokenizer_path=str(smollm2_dir))
    url = server.start_in_thread()
    yield Node(node_id="job-node", url=url, model="smollm2", tokenizer=str(smollm2_dir),
               tasks=["gsm8k"])
    server.stop()


async def _register_and_count(stores: StoreSettings, node: Node | None) -> int:
    conns = StoreConnections(Settings(stores=stores))
    try:
        mongo = await conns.mongo()
        if node is not None:
            await mongo.nodes.add(node)
        return await mongo.samples.count()
    finally:
        await conns.close()


def job_runtime_env(stores: StoreSettings) -> dict[str, object]:
    """What ``ray job submit --working-dir . --runtime-env-json ...`` sends."""
    assert stores.postgres_url and stores.mongo_url
    return {
        "working_dir": str(PROJECT_ROOT),
        "excludes": EXCLUDES,
        "env_vars": {
            "TESTBENCH_POSTGRES_URL": stores.postgres_url,
            "TESTBENCH_MONGO_URL": stores.mongo_url,
            "TESTBENCH_STORES__MONGO_DATABASE": stores.mongo_database,
            "TESTBENCH_MANAGER__TARGET_SAMPLES": "2",
            "TESTBENCH_MANAGER__TICK_S": "0.5",
            "TESTBENCH_MANAGER__NODE_REFRESH_S": "0",
            # the test node listens on loopback: allowlisted explicitly
            "TESTBENCH_REQUESTER__ENDPOINT_ALLOWLIST": "{networks: [127.0.0.0/8]}",
            **OFFLINE,
        },
    }


@pytest.mark.slow  # ~2 min here: a second Ray head with its dashboard, then the job
def test_the_loop_runs_as_a_ray_job_and_measures(
    ray_head: RayHead, loaded_stores: StoreSettings, job_node: Node
) -> None:
    stores = loaded_stores.model_copy(update={"mongo_database": f"job_{uuid.uuid4().hex[:8]}"})
    asyncio.run(_register_and_count(stores, job_node))
    client = JobSubmissionClient(ray_head.dashboard_url)
    job_id = client.submit_job(
        entrypoint="python -m cluster run --until-full --timeout 240",
        runtime_env=job_runtime_env(stores),
    )
    deadline = time.monotonic() + 420
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "samples 2/2 (100%)" in logs, logs[-3000:]  # the CLI's progress lines
    assert "job-node" in logs  # and its scores table
    assert asyncio.run(_register_and_count(stores, None)) >= 2

    managers = list_actors(address=ray_head.dashboard_url,
                           filters=[("name", "=", MANAGER_NAME)], detail=True)
    assert [(a.state, a.ray_namespace) for a in managers] == [("ALIVE", "testbench")]
