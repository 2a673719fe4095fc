"""Deploying the node's LLM app for ``/api/v1/inference/up`` (a pluggable interface).

The real deployer runs the Serve LLM app built by ``serve_apps.llm.build_llm_node_app``
(its own issue) beside the PoC app; tests inject a fake that deploys nothing.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from cluster.core.errors import TestbenchError

LLM_BUILDER = "serve_apps.llm:build_llm_node_app"


class DeployError(TestbenchError):
    """The LLM app could not be deployed or removed."""


class LlmEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    app_name: str
    route_prefix: str | None


class LlmDeployer(Protocol):
    async def deploy(self, model: str, config: dict[str, Any]) -> LlmEndpoint: ...

    async def teardown(self, endpoint: LlmEndpoint) -> None: ...


def load_object(import_path: str) -> Any:
    """``package.module:attribute`` -> the attribute."""
    module_name, _, attr = import_path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"import path must look like 'package.module:name', got {import_path!r}")
    return getattr(importlib.import_module(module_name), attr)


class ServeLlmDeployer:
    """Runs the LLM node app for ``model`` as its own Serve app.

    The builder gets ``{"model_id": model, "model_source": model, **config}``: ``config``
    carries any other ``LLMNodeConfig`` field (``model_source`` for a local directory,
    ``device``, ``engine_kwargs``...).
    """

    def __init__(self, app_name: str = "llm-node", route_prefix: str = "/llm",
                 builder: str = LLM_BUILDER) -> None:
        self._app_name = app_name
        self._route_prefix = route_prefix
        self._builder = builder

    async def deploy(self, model: str, config: dict[str, Any]) -> LlmEndpoint:
        from ray import serve

        try:
            build = load_object(self._builder)
        except (ImportError, AttributeError) as exc:
            raise DeployError(
                f"the LLM app builder {self._builder} is not available: {exc}"
            ) from exc
        app = build({"model_id": model, "model_source": model, **config})
        await asyncio.to_thread(
            serve.run, app, name=self._app_name, route_prefix=self._route_prefix
        )
        return LlmEndpoint(model=model, app_name=self._app_name, route_prefix=self._route_prefix)

    async def teardown(self, endpoint: LlmEndpoint) -> None:
        from ray import serve

        await asyncio.to_thread(serve.delete, endpoint.app_name)
