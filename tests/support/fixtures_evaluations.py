"""One evaluations Serve app (and an API-only twin for fuzzing) per test session.

The app is what ``infra/kuberay`` and ``testbench demo --serve`` deploy
(``serve_apps.evaluations:build_evaluations_app`` under ``/evaluations``, from
``serve_apps/configs/evaluations.yaml`` through ``cluster/local/serve_nodes.py``), on the
session's Ray (``ray_session``: 4 logical CPUs) and stores (``loaded_stores``), with a
MongoDB database of its own, four tenants (carol without an endpoint allowlist), and short
leases and polls so a killed replica's runs resume within seconds. Serve is started on a free
port unless it already runs. Two test nodes answer: ``fast`` and ``slow`` (0.25 s a request).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from eval_app import LOOPBACK_TENANTS, TENANTS, EvalApp
from ray import serve

from cluster.core.settings import (
    EndpointAllowlist,
    EvaluationSettings,
    RequesterSettings,
    Settings,
    StoreSettings,
)
from cluster.local.serve_nodes import deploy_evaluations_app
from cluster.testing.testnode import NodeBehaviour, TestNode

APP_NAME = "evaluations"
FUZZ_APP_NAME = "evaluations-fuzz"


@pytest.fixture(scope="session")
def eval_serve_port(serve_http_port: int) -> int:
    return serve_http_port


@pytest.fixture(scope="session")
def eval_nodes(smollm2_dir: Path) -> Iterator[dict[str, TestNode]]:
    nodes = {
        "fast": TestNode(NodeBehaviour(mode="correct"), tokenizer_path=smollm2_dir),
        "slow": TestNode(NodeBehaviour(mode="correct", latency_s=0.25), tokenizer_path=smollm2_dir),
    }
    for node in nodes.values():
        node.start_in_thread()
    yield nodes
    for node in nodes.values():
        node.stop()


@pytest.fixture(scope="session")
def eval_settings(loaded_stores: StoreSettings) -> Settings:
    stores = loaded_stores.model_copy(update={"mongo_database": f"ev_{uuid.uuid4().hex[:10]}"})
    # Loopback (the test nodes) allowlisted explicitly: for the tenants but carol, and for
    # what runs in process (`testbench eval` without --server, the leaderboard's measuring).
    return Settings(
        stores=stores,
        requester=RequesterSettings(endpoint_allowlist=EndpointAllowlist.loopback()),
        evaluations=EvaluationSettings(
            tenants=TENANTS, max_concurrent_runs=2, per_run_concurrency=4, chunk_docs=8,
            lease_s=3.0, poll_s=0.5, progress_every_s=1.0,
            endpoint_allowlists={t: EndpointAllowlist.loopback() for t in LOOPBACK_TENANTS},
        ),
    )


def _deploy(name: str, settings: Settings, port: int) -> EvalApp:
    """Deployed as ``testbench demo --serve`` deploys it (the shipped evaluations.yaml, by
    ``deploy_evaluations_app``), with quicker health checks and shutdowns."""
    started = time.monotonic()
    url = deploy_evaluations_app(settings, port, name=name, deployment={
        "num_cpus": 0, "health_check_period_s": 2.0, "graceful_shutdown_timeout_s": 5.0})
    return EvalApp(name=name, url=url, settings=settings, start_s=time.monotonic() - started)


@pytest.fixture(scope="session")
def eval_app(eval_serve_port: int, eval_settings: Settings) -> Iterator[EvalApp]:
    app = _deploy(APP_NAME, eval_settings, eval_serve_port)
    yield app
    serve.delete(APP_NAME)


@pytest.fixture(scope="session")
def fuzz_app(eval_serve_port: int, eval_settings: Settings) -> Iterator[EvalApp]:
    """API only (``max_concurrent_runs: 0``): fuzzed submissions queue up, nothing runs."""
    settings = eval_settings.model_copy(update={
        "stores": eval_settings.stores.model_copy(
            update={"mongo_database": f"evf_{uuid.uuid4().hex[:10]}"}),
        "evaluations": eval_settings.evaluations.model_copy(update={"max_concurrent_runs": 0}),
    })
    app = _deploy(FUZZ_APP_NAME, settings, eval_serve_port)
    yield app
    serve.delete(FUZZ_APP_NAME)
