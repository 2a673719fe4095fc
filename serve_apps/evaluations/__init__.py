"""Evaluation as a service: lm-eval runs by ticket over REST, and the nodes' leaderboard.

``build_evaluations_app(config)`` returns the bound Serve application; Serve config YAMLs
and the KubeRay manifests name it ``serve_apps.evaluations:build_evaluations_app`` with an
optional :class:`EvaluationsAppConfig` as ``args``. Routes (under the app's route prefix):
``/v1/evaluations`` (submit, list), ``/v1/evaluations/{id}`` (status, cancel), ``/v1/evaluations/{id}/suspend|resume``,
``/v1/evaluations/{id}/logs`` (server-sent events), ``/v1/evaluations/{id}/results``
(lm-eval's results JSON), ``/leaderboard`` (HTML) and ``/v1/leaderboard`` (JSON).
"""

from typing import TYPE_CHECKING, Any

from serve_apps.evaluations.config import EvaluationsAppConfig, EvaluationsDeployment

if TYPE_CHECKING:
    from serve_apps.evaluations.server import EvaluationsServer, build_evaluations_app


def __getattr__(name: str) -> Any:
    # The server imports Ray Serve and FastAPI (~2 s): only what serves the app pays for it,
    # not every `testbench` command that speaks the API's wire format.
    if name in ("EvaluationsServer", "build_evaluations_app"):
        from serve_apps.evaluations import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EvaluationsAppConfig",
    "EvaluationsDeployment",
    "EvaluationsServer",
    "build_evaluations_app",
]
