"""The jobs app's Serve replica and its application builder (the package's one Ray place).

``JobsServer`` is a plain class (loads the node key, builds the FastAPI app); the builder
wraps it with ``serve.ingress`` and ``serve.deployment``. YAML:
``import_path: serve_apps.streaming.server:build_jobs_app`` with ``args`` = JobsAppConfig.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray import serve

from serve_apps.streaming.config import JobsAppConfig

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application


class JobsServer:
    """One replica of a job: the node's key and the forwarding routes."""

    def __init__(self, config: JobsAppConfig) -> None:
        from serve_apps.streaming.serving import JobServing

        self._config = config
        self._serving = JobServing(config, config.signing_key())

    def __serve_build_asgi_app__(self) -> FastAPI:
        from serve_apps.streaming.routes import create_api

        return create_api(self._serving, self._config.auth)

    async def __del__(self) -> None:
        await self._serving.close()


def build_jobs_app(config: dict[str, Any] | JobsAppConfig) -> Application:
    """The bound Serve application of one streaming job."""
    job = config if isinstance(config, JobsAppConfig) else JobsAppConfig.model_validate(config)
    options = job.deployment
    deployment = serve.deployment(
        name=options.name,
        num_replicas=options.num_replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.num_cpus},
    )(serve.ingress()(JobsServer))
    return deployment.bind(job)
