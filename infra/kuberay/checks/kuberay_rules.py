"""The KubeRay operator's own spec rules, beyond what its CRD schemas say.

After KubeRay's ``ValidateRayClusterSpec`` / ``ValidateRayServiceSpec`` /
``ValidateRayJobSpec`` (names, replica bounds, clusterSelector, runtimeEnvYAML), plus
testbench's rules for its Ray clusters: one image and the Ray version ``pyproject.toml``
pins, cpu and memory requests on every container.
"""

from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from infra.kuberay.checks.crd_schema import DNS1035_LABEL, DNS1123_LABEL
from infra.kuberay.checks.objects import GPU_RESOURCE, Obj, obj_id, ray_groups
from infra.kuberay.checks.paths import REPO_ROOT

MAX_NAME = {"RayCluster": 53, "RayService": 47, "RayJob": 47}  # KubeRay's Max*NameLength
JOB_SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


@functools.cache
def pinned_ray_version(repo_root: Path = REPO_ROOT) -> str | None:
    """The ``x`` of ``ray==x`` (or ``ray[extras]==x``) in the project's dependencies."""
    try:
        project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    for dep in project.get("dependencies", []):
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    return None


def ray_cluster_spec_rules(spec: dict[str, Any], where: str,
                           repo_root: Path = REPO_ROOT) -> list[str]:
    """A RayCluster spec (also a RayService's ``rayClusterConfig``, a RayJob's
    ``rayClusterSpec``)."""
    errors: list[str] = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    names: set[str] = set()
    images: set[str] = set()
    for name, group in ray_groups(spec):
        gw = f"{where}: {'headGroupSpec' if name == 'head' else f'worker group {name}'}"
        group_containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not group_containers:
            errors.append(f"{gw}: needs at least one container")
            continue
        images.add(str(group_containers[0].get("image")))
        params = group.get("rayStartParams") or {}
        if group.get("resources") and ({"num-cpus", "num-gpus", "memory", "resources"} & set(params)):
            errors.append(f"{gw}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{gw}: rayStartParams['labels'] is not supported; use labels")
        for c in group_containers:
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            if not requests.get("cpu") or not requests.get("memory"):
                errors.append(f"{gw}: container {c.get('name')} requests no cpu or memory")
            if GPU_RESOURCE in requests and str(requests[GPU_RESOURCE]) != str(limits.get(GPU_RESOURCE)):
                errors.append(f"{gw}: container {c.get('name')}: {GPU_RESOURCE} requests must "
                              "equal limits")
        if name == "head":
            continue
        if name in names:
            errors.append(f"{gw}: duplicate group name")
        names.add(name)
        if not re.fullmatch(DNS1123_LABEL, name):
            errors.append(f"{gw}: group name is not a DNS-1123 label")
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{gw}: minReplicas and maxReplicas are required without autoscaling")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{gw}: minReplicas {lo} > maxReplicas {hi}")
        if n is not None and ((lo is not None and n < lo) or (hi is not None and n > hi)):
            errors.append(f"{gw}: replicas {n} outside [{lo}, {hi}]")
        if group.get("idleTimeoutSeconds") is not None and not v2:
            errors.append(f"{gw}: idleTimeoutSeconds needs autoscalerOptions.version v2")
    if len(images) > 1:
        errors.append(f"{where}: Ray containers use different images {sorted(images)}; "
                      "head and workers must run the same Ray and testbench")
    pinned = pinned_ray_version(repo_root)
    if pinned and spec.get("rayVersion") != pinned:
        errors.append(f"{where}: rayVersion {spec.get('rayVersion')!r} is not the pinned "
                      f"ray=={pinned} (pyproject.toml)")
    return errors


def name_rules(obj: Obj) -> list[str]:
    """KubeRay derives Service and pod names from the object's name: a DNS-1035 label short
    enough to leave room for the suffixes."""
    name = obj["metadata"].get("name", "")
    limit = MAX_NAME[obj["kind"]]
    errors = []
    if len(name) > limit:
        errors.append(f"{obj_id(obj)}: name longer than {limit} characters")
    if not re.fullmatch(DNS1035_LABEL, name):
        errors.append(f"{obj_id(obj)}: name is not a DNS-1035 label")
    return errors


def runtime_env_errors(text: str, where: str) -> list[str]:
    """A RayJob's ``runtimeEnvYAML`` read by Ray's ``RuntimeEnv``, unknown fields refused."""
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"{where}: runtimeEnvYAML is not YAML: {exc}"]
    if env is None:
        return []
    if not isinstance(env, dict):
        return [f"{where}: runtimeEnvYAML must be a mapping"]
    from ray.runtime_env import RuntimeEnv

    unknown = set(env) - set(RuntimeEnv.known_fields)
    if unknown:
        return [f"{where}: runtimeEnvYAML: unknown fields {sorted(unknown)}"]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        return [f"{where}: runtimeEnvYAML: {exc}"]
    return []


def ray_service_rules(obj: Obj) -> list[str]:
    cluster = (obj.get("spec") or {}).get("rayClusterConfig") or {}
    errors = ray_cluster_spec_rules(cluster, obj_id(obj))
    head_service = (cluster.get("headGroupSpec") or {}).get("headService") or {}
    if (head_service.get("metadata") or {}).get("name"):
        errors.append(f"{obj_id(obj)}: headService.metadata.name must not be set")
    return errors


def ray_job_rules(obj: Obj, objects: list[Obj]) -> list[str]:
    """A RayJob, its clusterSelector resolved among ``objects``."""
    spec, where = obj.get("spec") or {}, obj_id(obj)
    errors: list[str] = []
    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in JOB_SUBMISSION_MODES:
        errors.append(f"{where}: submissionMode {mode!r} is not one of "
                      f"{sorted(JOB_SUBMISSION_MODES)}")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        errors.append(f"{where}: suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished") and not spec.get("shutdownAfterJobFinishes"):
        errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if not spec.get("rayClusterSpec") and not selector:
        errors.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
    if selector:
        cluster = selector.get("ray.io/cluster")
        if not cluster:
            errors.append(f"{where}: clusterSelector needs ray.io/cluster")
        elif not any(o["kind"] == "RayCluster" and o["metadata"]["name"] == cluster
                     for o in objects):
            errors.append(f"{where}: clusterSelector names RayCluster {cluster!r}, "
                          "which is not defined here")
        if spec.get("submissionMode") == "SidecarMode":
            errors.append(f"{where}: clusterSelector is not supported in SidecarMode")
        if (spec.get("backoffLimit") or 0) > 0:
            errors.append(f"{where}: backoffLimit is incompatible with clusterSelector")
    if spec.get("rayClusterSpec"):
        errors.extend(ray_cluster_spec_rules(spec["rayClusterSpec"], where))
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(key) is not None and spec[key] <= 0:
            errors.append(f"{where}: {key} must be positive")
    errors.extend(runtime_env_errors(spec.get("runtimeEnvYAML") or "", where))
    return errors


def kuberay_rule_errors(obj: Obj, objects: list[Obj]) -> list[str]:
    """Every operator rule for one schema-valid RayCluster, RayService or RayJob."""
    errors = name_rules(obj)
    if obj["kind"] == "RayCluster":
        errors += ray_cluster_spec_rules(obj.get("spec") or {}, obj_id(obj))
    elif obj["kind"] == "RayService":
        errors += ray_service_rules(obj)
    elif obj["kind"] == "RayJob":
        errors += ray_job_rules(obj, objects)
    return errors
