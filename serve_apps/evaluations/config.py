"""``EvaluationsAppConfig``: the evaluations app's settings source and Serve placement.

Serve config YAMLs pass these fields as ``args`` to
:func:`serve_apps.evaluations.build_evaluations_app`; with no ``args`` (the KubeRay
manifests) the app reads testbench's settings the usual way: ``$TESTBENCH_CONFIG`` and the
``TESTBENCH_*`` environment (store URLs and tenant tokens from Secrets).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cluster.core.deployment import DeploymentOptions
from cluster.core.settings import Settings, apply_env_overrides


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvaluationsDeployment(DeploymentOptions):
    """Ray Serve placement of the app's replicas (each executes runs and serves the API)."""

    name: str = "EvaluationsServer"


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class EvaluationsAppConfig(_Strict):
    """Where the app's testbench settings come from, and how Serve places it.

    Settings = ``settings_path`` (else ``$TESTBENCH_CONFIG``), then ``settings`` merged in,
    then the ``TESTBENCH_*`` environment on top (as everywhere in testbench).
    """

    settings_path: Path | None = Field(default=None, description="a testbench settings YAML")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="settings sections merged over the file"
    )
    deployment: EvaluationsDeployment = Field(default_factory=EvaluationsDeployment)

    def load_settings(self, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        path = self.settings_path or env.get("TESTBENCH_CONFIG")
        data: dict[str, Any] = {}
        if path:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: settings must be a YAML mapping")
            data = loaded
        data = _deep_merge(data, self.settings)
        return Settings.model_validate(apply_env_overrides(data, env))
