"""Evaluation as a service: lm-eval runs by ticket over REST, and the nodes' leaderboard.

``build_evaluations_app(config)`` returns the bound Serve application; Serve config YAMLs
and the KubeRay manifests name it ``serve_apps.evaluations:build_evaluations_app`` with an
optional :class:`EvaluationsAppConfig` as ``args``. Routes (under the app's route prefix):
``/v1/evaluations`` (submit, list), ``/v1/evaluations/{id}`` (status, cancel),
``/v1/evaluations/{id}/logs`` (server-sent events), ``/v1/evaluations/{id}/results``
(lm-eval's results JSON), ``/leaderboard`` (HTML) and ``/v1/leaderboard`` (JSON).
"""

from serve_apps.evaluations.config import EvaluationsAppConfig, EvaluationsDeployment
from serve_apps.evaluations.server import EvaluationsServer, build_evaluations_app

__all__ = [
    "EvaluationsAppConfig",
    "EvaluationsDeployment",
    "EvaluationsServer",
    "build_evaluations_app",
]
