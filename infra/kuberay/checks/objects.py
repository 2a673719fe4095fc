"""Reading rendered Kubernetes objects: ids, pod templates, containers, Ray groups."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Obj = dict[str, Any]

GPU_RESOURCE = "nvidia.com/gpu"
RAY_GROUP = "ray.io/"


def obj_id(obj: Obj) -> str:
    """``Kind/namespace/name`` (``Kind/name`` without a namespace)."""
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')}/{ns}{meta.get('name')}"


def is_ray_object(obj: Obj) -> bool:
    return str(obj.get("apiVersion", "")).startswith(RAY_GROUP)


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container (and init container) anywhere inside an object."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def pod_containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers and init containers of one pod template."""
    spec = template.get("spec") or {}
    return list(spec.get("containers") or []) + list(spec.get("initContainers") or [])


def ray_groups(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group) for the head (``"head"``) and each worker group of a RayCluster spec."""
    head = cluster_spec.get("headGroupSpec") or {}
    return [("head", head)] + [(str(g.get("groupName")), g)
                               for g in cluster_spec.get("workerGroupSpecs") or []]


def has_gpus(cluster_spec: dict[str, Any]) -> bool:
    return any(GPU_RESOURCE in ((c.get("resources") or {}).get("limits") or {})
               for _, g in ray_groups(cluster_spec)
               for c in pod_containers(g.get("template") or {}))


def pod_templates(obj: Obj) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod template in a rendered object."""
    spec = obj.get("spec") or {}
    kind = obj["kind"]
    if kind in ("StatefulSet", "Deployment", "DaemonSet", "Job", "ReplicaSet"):
        yield obj_id(obj), spec.get("template") or {}
    cluster_spec = {"RayCluster": spec, "RayService": spec.get("rayClusterConfig"),
                    "RayJob": spec.get("rayClusterSpec")}.get(kind)
    for name, group in ray_groups(cluster_spec) if cluster_spec else []:
        yield f"{obj_id(obj)} group {name}", group.get("template") or {}
    if kind == "RayJob" and spec.get("submitterPodTemplate"):
        yield f"{obj_id(obj)} submitter", spec["submitterPodTemplate"]
