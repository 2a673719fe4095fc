"""The diffusion node's Serve replica and its application builder.

``DiffusionServer`` is a plain class (loads the engine, builds the FastAPI app); the
builder wraps it with ``serve.ingress`` (late-bound: Serve calls
``__serve_build_asgi_app__`` after the constructor) and ``serve.deployment``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray import serve

from cluster.images.config import DiffusionNodeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

    from serve_apps.diffusion.serving import ImageServing


class DiffusionServer:
    """One replica of a diffusion node: a loaded pipeline behind the node's routes."""

    def __init__(self, config: DiffusionNodeConfig) -> None:
        from cluster.images.engine import DiffusersEngine
        from serve_apps.diffusion.serving import ImageServing

        self._serving: ImageServing = ImageServing(DiffusersEngine.load(config), config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from serve_apps.diffusion.routes import create_api

        return create_api(self._serving)


def build_diffusion_app(config: dict[str, Any] | DiffusionNodeConfig) -> Application:
    """The bound Serve application of a diffusion node (the YAML ``import_path`` target)."""
    node = config if isinstance(config, DiffusionNodeConfig) else (
        DiffusionNodeConfig.model_validate(config)
    )
    deployment = serve.deployment(**node.deployment.serve_options())(
        serve.ingress()(DiffusionServer)
    )
    return deployment.bind(node)
