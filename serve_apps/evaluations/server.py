"""The evaluations app's Serve replica and its application builder.

``EvaluationsServer`` is a plain class (settings → service → FastAPI app); the builder wraps
it with ``serve.ingress`` (late-bound: Serve calls ``__serve_build_asgi_app__`` after the
constructor) and ``serve.deployment``. The FastAPI lifespan, which Serve runs on the replica's
event loop, starts the service and its run executor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray import serve

from serve_apps.evaluations.config import EvaluationsAppConfig

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

    from serve_apps.evaluations.serving import EvaluationService


class EvaluationsServer:
    """One replica: the evaluations API, the leaderboard page and a run executor."""

    def __init__(self, config: EvaluationsAppConfig) -> None:
        from serve_apps.evaluations.serving import EvaluationService

        self._service: EvaluationService = EvaluationService(config.load_settings())

    def __serve_build_asgi_app__(self) -> FastAPI:
        from serve_apps.evaluations.routes import create_api

        return create_api(self._service)

    def check_health(self) -> None:
        """Serve's periodic health check: a dead run executor gets the replica replaced."""
        self._service.check_health()


def build_evaluations_app(
    config: dict[str, Any] | EvaluationsAppConfig | None = None,
) -> Application:
    """The bound Serve application (the YAML ``import_path`` target; ``args`` optional)."""
    app = config if isinstance(config, EvaluationsAppConfig) else (
        EvaluationsAppConfig.model_validate(config or {})
    )
    deployment = serve.deployment(**app.deployment.serve_options())(
        serve.ingress()(EvaluationsServer)
    )
    return deployment.bind(app)
