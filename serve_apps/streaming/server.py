"""The streaming app's Serve replica and its application builder (the package's one Ray place).

``StreamingServer`` is a plain class (loads the node key, builds the FastAPI app); the builder
wraps it with ``serve.ingress`` and ``serve.deployment``. YAML:
``import_path: serve_apps.streaming.server:build_streaming_app`` with ``args`` = StreamingJobConfig.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray import serve

from serve_apps.streaming.config import StreamingJobConfig

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application


class StreamingServer:
    """One replica of a job: the node's key and the forwarding routes."""

    def __init__(self, config: StreamingJobConfig) -> None:
        from serve_apps.streaming.serving import StreamingServing

        self._config = config
        self._serving = StreamingServing(config, config.signing_key())

    def __serve_build_asgi_app__(self) -> FastAPI:
        from serve_apps.streaming.routes import create_api

        return create_api(self._serving, self._config.auth)

    async def __del__(self) -> None:
        await self._serving.close()


def build_streaming_app(config: dict[str, Any] | StreamingJobConfig) -> Application:
    """The bound Serve application of one streaming job."""
    job = config if isinstance(config, StreamingJobConfig) else StreamingJobConfig.model_validate(config)
    deployment = serve.deployment(**job.deployment.serve_options())(serve.ingress()(StreamingServer))
    return deployment.bind(job)
