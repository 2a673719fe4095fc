"""Session-wide fixtures: one set of embedded stores, one Ray cluster, one tokenizer.

Everything here is real: pgserver's PostgreSQL, nx-27017's MongoDB wire protocol,
a local Ray cluster. Nothing reaches a model or dataset hub.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Shared helpers and fixtures live in tests/support/ (not a package: its modules import by
# bare name, and node_loss_script.py runs outside pytest), loaded here for every folder.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
pytest_plugins = (
    "fixtures_faults", "fixtures_honesty", "fixtures_serve", "fixtures_evaluations", "fixtures_poc",
    "fixtures_train",
)

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cluster.core.settings import (  # noqa: E402
    PROJECT_ROOT,
    EndpointAllowlist,
    RequesterSettings,
    Settings,
    StoreSettings,
)

CACHE_DIR = PROJECT_ROOT / ".cache"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from cluster.local.models import prepare_smollm2

    return prepare_smollm2(CACHE_DIR)


@pytest.fixture(scope="session")
def session_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSettings]:
    """Embedded PostgreSQL and MongoDB for the whole session."""
    from cluster.local.embedded import EmbeddedStores

    data_dir = tmp_path_factory.mktemp("stores")
    embedded = EmbeddedStores(StoreSettings(data_dir=data_dir))
    resolved = embedded.start()
    try:
        yield resolved
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def loaded_stores(session_stores: StoreSettings) -> StoreSettings:
    """The shipped task datasets loaded into the session's PostgreSQL."""
    from cluster.tasks.datasets import load_datasets

    asyncio.run(load_datasets(Settings(stores=session_stores)))
    return session_stores


@pytest.fixture
def fresh_settings(loaded_stores: StoreSettings) -> Settings:
    """Settings on the session stores with a MongoDB database of its own. The test nodes
    listen on loopback, which the endpoint policy refuses unless allowlisted: allowlisted."""
    stores = loaded_stores.model_copy(update={"mongo_database": f"t_{uuid.uuid4().hex[:10]}"})
    return Settings(stores=stores,
                    requester=RequesterSettings(endpoint_allowlist=EndpointAllowlist.loopback()))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    # A busy 2-core machine can take longer than Ray's default to bring the raylet up.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")
    if not ray.is_initialized():
        # Logical CPUs above the 2 real ones: Serve LLM's ingress and engine bundle take 1
        # each, and at one point two vLLM engines run (the session's node and the MLNode's
        # trained model, tests/serve_apps/poc/test_mlnode_training.py).
        ray.init(num_cpus=6, namespace="testbench", include_dashboard=False,
                 log_to_driver=False)
    yield


@pytest.fixture(scope="session")
def serve_http_port(ray_session: None) -> Iterator[int]:
    """The session's Serve HTTP port (started on a free port unless Serve already runs)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from cluster.local.serve_nodes import start_serve

    started = _get_global_client(raise_if_no_controller_running=False) is None
    yield start_serve()
    if started:
        serve.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks by what a test uses, so ``-m serve`` / ``-m "not serve"`` select without folders:
    ``serve`` for anything on the session's Ray Serve."""
    for item in items:
        if "serve_http_port" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.serve)
