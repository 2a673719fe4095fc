"""Core objects (everything but ``ray.io``) against the Kubernetes API schemas, strictly,
with ``kubernetes-validate`` when it is installed."""

from __future__ import annotations

from infra.kuberay.checks.objects import Obj, is_ray_object, obj_id
from infra.kuberay.checks.report import Report

KUBERNETES_VERSION = "1.30"  # the oldest API the core objects are checked against


def core_schema_errors(objects: list[Obj], report: Report) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        report.notes.append("kubernetes-validate not installed: core objects checked by the "
                            "cross-reference rules only")
        return
    for obj in objects:
        if is_ray_object(obj):
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(root)"
            report.errors.append(f"{obj_id(obj)}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            report.errors.append(f"{obj_id(obj)}: {exc.message}")
