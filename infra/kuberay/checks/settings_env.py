"""The ``TESTBENCH_*`` environment the Ray pods get, against ``cluster.core.settings``."""

from __future__ import annotations

import yaml

from infra.kuberay.checks.objects import Obj, is_ray_object, pod_containers, pod_templates
from infra.kuberay.checks.report import ErrorsAndNotes

# Read by cluster.core.settings outside the SECTION__FIELD scheme.
_SETTINGS_SPECIAL = {"TESTBENCH_MONGO_URL", "TESTBENCH_POSTGRES_URL", "TESTBENCH_CONFIG"}
# Stand-ins for values that come from Secrets: Settings only needs their shape.
_SECRET_STAND_INS = {"POSTGRES": "postgresql://u:p@host:5432/db",
                     "MONGO": "mongodb://u:p@host:27017/"}


def testbench_env(objects: list[Obj]) -> dict[str, str]:
    """The TESTBENCH_* environment a measuring-loop driver sees: ConfigMaps and Secrets the
    Ray pods load, plus the RayJob's runtime env."""
    env: dict[str, str] = {}
    config_maps = {o["metadata"]["name"]: o.get("data") or {}
                   for o in objects if o["kind"] == "ConfigMap"}
    for obj in objects:
        if not is_ray_object(obj):
            continue
        for _, template in pod_templates(obj):
            for c in pod_containers(template):
                for e in c.get("envFrom") or []:
                    env.update(config_maps.get((e.get("configMapRef") or {}).get("name"), {}))
                for e in c.get("env") or []:
                    if "secretKeyRef" in (e.get("valueFrom") or {}):
                        store = "POSTGRES" if "POSTGRES" in e["name"] else "MONGO"
                        env[e["name"]] = _SECRET_STAND_INS[store]
                    elif "value" in e:
                        env[e["name"]] = str(e["value"])
        if obj["kind"] == "RayJob":
            runtime = yaml.safe_load((obj.get("spec") or {}).get("runtimeEnvYAML") or "") or {}
            if isinstance(runtime, dict):
                env.update({k: str(v) for k, v in (runtime.get("env_vars") or {}).items()})
    return {k: v for k, v in env.items() if k.startswith("TESTBENCH_")}


def settings_errors(env: dict[str, str], where: str) -> ErrorsAndNotes:
    """Do these TESTBENCH_* variables configure real settings? (errors, notes)"""
    errors = [f"{where}: {k} is ignored by cluster.core.settings (no __ between section and field)"
              for k in env
              if k.startswith("TESTBENCH_") and k not in _SETTINGS_SPECIAL and "__" not in k]
    try:
        from pydantic import ValidationError

        from cluster.core.settings import load_settings
    except ImportError as exc:
        return errors, [f"{where}: cluster.core.settings not importable ({exc}); settings not checked"]
    try:
        load_settings(None, environ={k: str(v) for k, v in env.items()
                                     if k != "TESTBENCH_CONFIG"})
    except (ValidationError, ValueError) as exc:
        errors.append(f"{where}: TESTBENCH_* overrides rejected by Settings: {exc}")
    return errors, []
