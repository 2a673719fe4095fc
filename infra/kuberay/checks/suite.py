"""Every check on one rendered kustomization."""

from __future__ import annotations

from pathlib import Path

from infra.kuberay.checks.core_schema import core_schema_errors
from infra.kuberay.checks.crd_schema import ray_schema_errors
from infra.kuberay.checks.entrypoint import entrypoint_errors
from infra.kuberay.checks.kuberay_rules import kuberay_rule_errors
from infra.kuberay.checks.objects import Obj, is_ray_object, obj_id
from infra.kuberay.checks.paths import CRD_DIR
from infra.kuberay.checks.references import reference_errors, store_url_errors, workload_errors
from infra.kuberay.checks.report import Report
from infra.kuberay.checks.serve_config import ray_service_serve_errors, serve_args_errors
from infra.kuberay.checks.settings_env import settings_errors, testbench_env


def ray_object_errors(obj: Obj, objects: list[Obj], report: Report) -> None:
    """KubeRay's rules, the serve config and the job's entrypoint of one schema-valid Ray
    object."""
    report.errors.extend(kuberay_rule_errors(obj, objects))
    if obj["kind"] == "RayService":
        report.extend(ray_service_serve_errors(obj))
    elif obj["kind"] == "RayJob":
        entrypoint = str((obj.get("spec") or {}).get("entrypoint") or "")
        report.extend(entrypoint_errors(entrypoint, obj_id(obj)))


def check_objects(objects: list[Obj], crd_dir: Path = CRD_DIR, app_args: bool = False) -> Report:
    """Every check on a rendered set of objects; ``app_args`` adds the slow
    ``serve_args_errors``."""
    report = Report()
    for obj in objects:
        if is_ray_object(obj):
            errors, schema_valid = ray_schema_errors(obj, crd_dir)
            report.errors.extend(errors)
            if schema_valid:  # the operator rules assume a schema-valid object
                ray_object_errors(obj, objects, report)
    core_schema_errors(objects, report)
    reference_errors(objects, report)
    report.errors.extend(workload_errors(objects))
    report.errors.extend(store_url_errors(objects))
    report.extend(settings_errors(testbench_env(objects), "TESTBENCH_* settings"))
    if app_args:
        report.extend(serve_args_errors(objects))
    return report
