"""Render and check testbench's KubeRay manifests without a Kubernetes cluster.

    python infra/kuberay/check_manifests.py [KUSTOMIZATION_DIR ...]

(default: both overlays). For each kustomization directory it:

1. renders it with the small kustomize subset implemented here: ``resources``, ``patches``
   (JSON 6902, or strategic merge of maps and ``$patch: delete``), ``namespace``,
   ``labels`` and ``images``. Anything else in a kustomization is refused rather than
   ignored, so the rendering never silently differs from ``kubectl kustomize``;
2. validates every RayCluster, RayService and RayJob against the ``openAPIV3Schema`` of the
   KubeRay CRDs in ``crds/``, read the way the API server reads it with strict field
   validation: unknown fields are errors, ``nullable``, ``x-kubernetes-int-or-string``,
   int32/int64 ranges and unique ``x-kubernetes-list-type: map|set`` entries are honoured.
   CEL rules (``x-kubernetes-validations``) are not evaluated. Then the operator's own spec
   rules (KubeRay's ``ValidateRayClusterSpec`` / ``ValidateRayJobSpec`` /
   ``ValidateRayServiceSpec``: names, replica bounds, clusterSelector, runtimeEnvYAML);
3. validates ``serveConfigV2`` with Ray Serve's ``ServeDeploySchema`` (and refuses keys
   that schema would silently ignore), ``runtimeEnvYAML`` with Ray's ``RuntimeEnv``, a
   testbench entrypoint with the CLI's own parser and the ``TESTBENCH_*`` overrides with
   ``cluster.core.settings.Settings``;
4. validates core objects with ``kubernetes-validate`` (strict) when it is installed, and
   cross-checks references: Secrets, ConfigMaps and their keys, StatefulSet services,
   volume mounts, the store URLs against the Services and credentials, one image and the
   pinned Ray version per Ray cluster.

Exit status: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import io
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

KUBERAY_DIR = Path(__file__).resolve().parent
REPO_ROOT = KUBERAY_DIR.parent.parent
CRD_DIR = KUBERAY_DIR / "crds"
OVERLAYS = ("cpu-dev", "gpu-prod")
KUBERNETES_VERSION = "1.30"  # the oldest API the core objects are checked against

try:
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _Loader = yaml.SafeLoader

Obj = dict[str, Any]


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render (or kustomize would refuse)."""


# ---- YAML --------------------------------------------------------------------------------
def load_documents(path: Path) -> list[Any]:
    try:
        return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]
    except yaml.YAMLError as exc:
        raise KustomizeError(f"{path}: not valid YAML: {exc}") from exc


def obj_id(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')}/{ns}{meta.get('name')}"


def _group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


# ---- the kustomize subset ----------------------------------------------------------------
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                  "PersistentVolume", "StorageClass", "PriorityClass"}


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def render_kustomization(directory: str | Path) -> list[Obj]:
    """Render a kustomization directory as ``kubectl kustomize`` would (for our subset)."""
    directory = Path(directory).resolve()
    path = _kustomization_file(directory)
    docs = load_documents(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise KustomizeError(f"{path}: must hold one mapping")
    kust = docs[0]
    unsupported = set(kust) - SUPPORTED_FIELDS
    if unsupported:
        raise KustomizeError(f"{path}: fields not supported by this renderer: {sorted(unsupported)}")
    if kust.get("apiVersion", "kustomize.config.k8s.io/v1beta1") != "kustomize.config.k8s.io/v1beta1":
        raise KustomizeError(f"{path}: apiVersion must be kustomize.config.k8s.io/v1beta1")
    if kust.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind must be Kustomization (components are not supported)")

    objects: list[Obj] = []
    for entry in kust.get("resources") or []:
        if not isinstance(entry, str) or "://" in entry or entry.startswith("github.com/"):
            raise KustomizeError(f"{path}: resource {entry!r}: only local files and directories")
        target = directory / entry
        if target.is_dir():
            objects.extend(render_kustomization(target))
        elif target.is_file():
            for doc in load_documents(target):
                if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                    raise KustomizeError(f"{target}: every document must be a Kubernetes object")
                if not (doc.get("metadata") or {}).get("name"):
                    raise KustomizeError(f"{target}: {doc['kind']} without metadata.name")
                objects.append(doc)
        else:
            raise KustomizeError(f"{path}: resource {entry!r} does not exist")
    _check_unique(objects, path)

    for i, patch in enumerate(kust.get("patches") or []):
        objects = _apply_patch(objects, patch, directory, f"{path}: patches[{i}]")
    if "namespace" in kust:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    for i, entry in enumerate(kust.get("labels") or []):
        _apply_labels(objects, entry, f"{path}: labels[{i}]")
    for i, entry in enumerate(kust.get("images") or []):
        _apply_image(objects, entry, f"{path}: images[{i}]")
    _check_unique(objects, path)
    return objects


def _check_unique(objects: list[Obj], where: Path) -> None:
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        key = (obj["apiVersion"], obj_id(obj))
        if key in seen:
            raise KustomizeError(f"{where}: {obj_id(obj)} is defined twice")
        seen.add(key)


def _matches(obj: Obj, target: dict[str, Any], where: str) -> bool:
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unsupported:
        raise KustomizeError(f"{where}: target fields not supported: {sorted(unsupported)}")
    group, version = _group_version(obj["apiVersion"])
    actual = {"group": group, "version": version, "kind": obj["kind"],
              "name": obj["metadata"]["name"], "namespace": obj["metadata"].get("namespace", "")}
    return all(re.fullmatch(str(pattern), actual[key]) for key, pattern in target.items())


def _apply_patch(objects: list[Obj], patch: Any, directory: Path, where: str) -> list[Obj]:
    if not isinstance(patch, dict) or set(patch) - {"path", "patch", "target"}:
        raise KustomizeError(f"{where}: a patch has `path` or `patch` and an optional `target`")
    if ("path" in patch) == ("patch" in patch):
        raise KustomizeError(f"{where}: give exactly one of `path` and `patch`")
    if "path" in patch:
        source = directory / patch["path"]
        if not source.is_file():
            raise KustomizeError(f"{where}: {source} does not exist")
        docs, where = load_documents(source), f"{where} ({source.name})"
    else:
        docs = [d for d in yaml.load_all(patch["patch"], Loader=_Loader) if d is not None]
    target = patch.get("target")
    if len(docs) == 1 and isinstance(docs[0], list):
        if not target:
            raise KustomizeError(f"{where}: a JSON 6902 patch needs a target")
        matched = [o for o in objects if _matches(o, target, where)]
        if not matched:
            raise KustomizeError(f"{where}: target {target} matches no object")
        for obj in matched:
            for j, op in enumerate(docs[0]):
                _json6902(obj, op, f"{where}[{j}] on {obj_id(obj)}")
        return objects
    if len(docs) != 1:
        raise KustomizeError(f"{where}: one document per strategic-merge patch (kustomize 5.5 "
                             "crashes on a file with several)")
    for doc in docs:
        if not isinstance(doc, dict):
            raise KustomizeError(f"{where}: a strategic-merge patch is a mapping")
        if target:
            matched = [o for o in objects if _matches(o, target, where)]
        else:
            try:
                matched = [o for o in objects if o["kind"] == doc["kind"]
                           and o["apiVersion"] == doc["apiVersion"]
                           and o["metadata"]["name"] == doc["metadata"]["name"]]
            except (KeyError, TypeError) as exc:
                raise KustomizeError(f"{where}: a patch without target names apiVersion, kind "
                                     "and metadata.name") from exc
        if not matched:
            raise KustomizeError(f"{where}: no object for patch {doc.get('kind')}/"
                                 f"{(doc.get('metadata') or {}).get('name')}")
        directive = doc.get("$patch")
        if directive == "delete":
            objects = [o for o in objects if all(o is not m for m in matched)]
            continue
        if directive is not None:
            raise KustomizeError(f"{where}: $patch: {directive} is not supported")
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
        for obj in matched:
            _merge(obj, body, f"{where} on {obj_id(obj)}")
    return objects


def _merge(base: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"{where}: directive {key} is not supported")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{where}.{key}")
        elif isinstance(value, list) and key in base:
            raise KustomizeError(
                f"{where}.{key}: lists in strategic-merge patches are not supported (kustomize "
                "merges some by key and replaces others): use a JSON 6902 patch")
        else:
            base[key] = copy.deepcopy(value)


def _pointer(path: str, where: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise KustomizeError(f"{where}: path {path!r} is not a JSON pointer")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _index(container: list[Any], token: str, where: str, allow_end: bool = False) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit():
        raise KustomizeError(f"{where}: {token!r} is not a list index")
    i = int(token)
    if i > len(container) or (i == len(container) and not allow_end):
        raise KustomizeError(f"{where}: index {i} is out of range")
    return i


def _json6902(obj: Obj, op: Any, where: str) -> None:
    if not isinstance(op, dict) or "op" not in op or "path" not in op:
        raise KustomizeError(f"{where}: each operation has `op` and `path`")
    tokens = _pointer(op["path"], where)
    parent: Any = obj
    for token in tokens[:-1]:
        if isinstance(parent, list):
            parent = parent[_index(parent, token, where)]
        elif isinstance(parent, dict) and token in parent:
            parent = parent[token]
        else:
            raise KustomizeError(f"{where}: {op['path']} does not exist")
    last, kind = tokens[-1], op["op"]
    if kind in ("add", "replace", "test") and "value" not in op:
        raise KustomizeError(f"{where}: `{kind}` needs a value")
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(_index(parent, last, where, allow_end=True), copy.deepcopy(op["value"]))
            return
        i = _index(parent, last, where)
        present, current = True, parent[i]
    elif isinstance(parent, dict):
        if kind == "add":
            parent[last] = copy.deepcopy(op["value"])
            return
        present, current = last in parent, parent.get(last)
        i = last  # type: ignore[assignment]
    else:
        raise KustomizeError(f"{where}: {op['path']} does not exist")
    if not present:
        raise KustomizeError(f"{where}: {op['path']} does not exist")
    if kind == "remove":
        del parent[i]
    elif kind == "replace":
        parent[i] = copy.deepcopy(op["value"])
    elif kind == "test":
        if current != op["value"]:
            raise KustomizeError(f"{where}: test failed: {op['path']} is {current!r}, "
                                 f"not {op['value']!r}")
    else:
        raise KustomizeError(f"{where}: operation {kind!r} is not supported")


def _apply_labels(objects: list[Obj], entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or set(entry) - {"pairs", "includeSelectors",
                                                     "includeTemplates"}:
        raise KustomizeError(f"{where}: only `pairs` (and includeSelectors/includeTemplates: "
                             "false) are supported")
    if entry.get("includeSelectors") or entry.get("includeTemplates"):
        raise KustomizeError(f"{where}: includeSelectors/includeTemplates are not supported")
    for obj in objects:
        labels = obj["metadata"].setdefault("labels", {})
        labels.update({str(k): str(v) for k, v in (entry.get("pairs") or {}).items()})


def split_image(image: str) -> tuple[str, str]:
    """``repo/name:tag@digest`` -> (``repo/name``, ``:tag@digest``)."""
    name, at, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon:] + at + digest
    return name, at + digest


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container (and init container) anywhere inside an object."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _apply_image(objects: list[Obj], entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or "name" not in entry or set(entry) - {
            "name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"{where}: an image has `name` and newName/newTag/digest")
    for obj in objects:
        for container in _containers(obj):
            image = container.get("image")
            if not isinstance(image, str):
                continue
            name, suffix = split_image(image)
            if name != entry["name"]:
                continue
            if "digest" in entry:
                suffix = f"@{entry['digest']}"
            elif "newTag" in entry:
                suffix = f":{entry['newTag']}"
            container["image"] = f"{entry.get('newName', name)}{suffix}"


# ---- CRD schemas -------------------------------------------------------------------------
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
RAY_API_VERSION = "ray.io/v1"
# Kubernetes name rules (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_KEY = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
             r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL},
        "labels": {"type": "object", "propertyNames": {"pattern": LABEL_KEY, "maxLength": 316},
                   "additionalProperties": {"type": "string", "maxLength": 63,
                                            "pattern": LABEL_VALUE}},
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "generateName": {"type": "string"},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}
_DROPPED_KEYWORDS = {"description", "default", "example", "externalDocs", "nullable",
                     "x-kubernetes-validations", "x-kubernetes-map-type",
                     "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
                     "x-kubernetes-embedded-resource"}


def structural_to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes structural schema as a JSON Schema (2020-12) with strict field checks.

    - an object schema without ``additionalProperties`` or
      ``x-kubernetes-preserve-unknown-fields`` is closed: the API server prunes unknown
      fields and ``kubectl apply`` (strict field validation) rejects them;
    - ``nullable: true`` admits null; ``x-kubernetes-int-or-string`` admits both;
    - ``x-kubernetes-list-type``/``-list-map-keys`` are kept for the validator below.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYWORDS:
            continue
        if key == "properties":
            out[key] = {name: structural_to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural_to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (node.get("type") == "object" and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    from jsonschema import ValidationError

    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen: list[Any] = []
        for item in instance:
            if item in seen:
                yield ValidationError(f"duplicate entry {item!r} in a list-type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        props = (schema.get("items") or {}).get("properties") or {}
        defaults = {k: (props.get(k) or {}).get("default") for k in keys}
        seen_keys: set[tuple[Any, ...]] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(str(item.get(k, defaults[k])) for k in keys)
            if key in seen_keys:
                shown = ", ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))
                yield ValidationError(f"duplicate entries for key ({shown})")
            seen_keys.add(key)


@functools.cache
def _validator_class() -> Any:
    from jsonschema import Draft202012Validator, validators

    return validators.extend(Draft202012Validator, {"x-kubernetes-list-type": _list_type})


@functools.cache
def _format_checker() -> Any:
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())

    def int_range(bits: int) -> Any:
        def check(value: Any) -> bool:
            if isinstance(value, bool) or not isinstance(value, int):
                return True
            return -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
        return check

    checker.checks("int32")(int_range(32))
    checker.checks("int64")(int_range(64))
    return checker


def crd_json_schema(kind: str, crd_dir: Path = CRD_DIR) -> dict[str, Any]:
    return _crd_json_schema(kind, Path(crd_dir).resolve())


@functools.cache
def _crd_json_schema(kind: str, crd_dir: Path) -> dict[str, Any]:
    path = crd_dir / CRD_FILES[kind]
    crd = yaml.load(path.read_text(), Loader=_Loader)
    if crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{path} defines {crd['spec']['names']['kind']}, not {kind}")
    group = crd["spec"]["group"]
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served"))
    schema = structural_to_json_schema(version["schema"]["openAPIV3Schema"])
    props = schema["properties"]
    props["apiVersion"] = {"const": f"{group}/v1"}
    props["kind"] = {"const": kind}
    props["metadata"] = OBJECT_META
    del props["status"]  # set by the operator, never in a manifest: rejected as unknown
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return schema


@functools.cache
def crd_validator(kind: str, crd_dir: Path = CRD_DIR) -> Any:
    return _validator_class()(crd_json_schema(kind, crd_dir), format_checker=_format_checker())


def validate_against_crd(obj: Obj, crd_dir: Path = CRD_DIR) -> list[str]:
    validator = crd_validator(obj["kind"], Path(crd_dir).resolve())
    errors = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        errors.append(f"{obj_id(obj)}: {where}: {err.message}")
    return errors


# ---- KubeRay operator rules --------------------------------------------------------------
MAX_NAME = {"RayCluster": 53, "RayService": 47, "RayJob": 47}  # KubeRay's Max*NameLength
JOB_SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
GPU = "nvidia.com/gpu"
GPU_DEVICES = {"gpu", "cuda"}  # LLMNodeConfig.device, DiffusionNodeConfig.device
STORE_SECRET = "testbench-stores"
CREDENTIALS_SECRET = "testbench-store-credentials"
SERVE_IMPORT_PATHS = {  # the builders DESIGN §6 / issue 3 agree on
    "llm": "serve_apps.llm:build_llm_node_app",
    "diffusion": "serve_apps.diffusion:build_diffusion_app",
    "evaluations": "serve_apps.evaluations:build_evaluations_app",
}


@functools.cache
def pinned_ray_version(repo_root: Path = REPO_ROOT) -> str | None:
    try:
        project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    for dep in project.get("dependencies", []):
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    return None


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    head = spec.get("headGroupSpec") or {}
    return [("head", head)] + [(str(g.get("groupName")), g)
                               for g in spec.get("workerGroupSpecs") or []]


def _pod_containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template.get("spec") or {}
    return list(spec.get("containers") or []) + list(spec.get("initContainers") or [])


def has_gpus(cluster_spec: dict[str, Any]) -> bool:
    return any(GPU in ((c.get("resources") or {}).get("limits") or {})
               for _, g in _groups(cluster_spec)
               for c in _pod_containers(g.get("template") or {}))


def ray_cluster_spec_rules(spec: dict[str, Any], where: str, repo_root: Path = REPO_ROOT) -> list[str]:
    errors: list[str] = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    names: set[str] = set()
    images: set[str] = set()
    for name, group in _groups(spec):
        gw = f"{where}: {'headGroupSpec' if name == 'head' else f'worker group {name}'}"
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            errors.append(f"{gw}: needs at least one container")
            continue
        images.add(str(containers[0].get("image")))
        params = group.get("rayStartParams") or {}
        if group.get("resources") and ({"num-cpus", "num-gpus", "memory", "resources"} & set(params)):
            errors.append(f"{gw}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{gw}: rayStartParams['labels'] is not supported; use labels")
        for c in containers:
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            if not requests.get("cpu") or not requests.get("memory"):
                errors.append(f"{gw}: container {c.get('name')} requests no cpu or memory")
            if GPU in requests and str(requests[GPU]) != str(limits.get(GPU)):
                errors.append(f"{gw}: container {c.get('name')}: {GPU} requests must equal limits")
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


def _name_rules(obj: Obj) -> list[str]:
    name = obj["metadata"].get("name", "")
    limit = MAX_NAME[obj["kind"]]
    errors = []
    if len(name) > limit:
        errors.append(f"{obj_id(obj)}: name longer than {limit} characters")
    if not re.fullmatch(DNS1035_LABEL, name):
        errors.append(f"{obj_id(obj)}: name is not a DNS-1035 label")
    return errors


def runtime_env_errors(text: str, where: str) -> list[str]:
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


# ---- serveConfigV2 -----------------------------------------------------------------------
def serve_apps(text: str) -> list[dict[str, Any]]:
    config = yaml.safe_load(text) or {}
    return list(config.get("applications") or []) if isinstance(config, dict) else []


def _unknown_keys(data: dict[str, Any], model: Any, where: str) -> list[str]:
    unknown = set(data) - set(model.model_fields)
    return [f"{where}: unknown keys {sorted(unknown)} (Serve would ignore them)"] if unknown else []


def serve_config_errors(text: Any, where: str) -> tuple[list[str], list[str]]:
    """(errors, notes) for a serveConfigV2 string."""
    if not isinstance(text, str):
        return [f"{where}: serveConfigV2 must be a YAML string"], []
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"{where}: serveConfigV2 is not YAML: {exc}"], []
    if not isinstance(config, dict):
        return [f"{where}: serveConfigV2 must be a YAML mapping"], []
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [f"{where}: serveConfigV2: {'.'.join(map(str, e['loc']))}: {e['msg']}"
                for e in exc.errors()], []
    errors = _unknown_keys(config, ServeDeploySchema, f"{where}: serveConfigV2")
    notes: list[str] = []
    for app in config["applications"]:
        aw = f"{where}: serveConfigV2 app {app.get('name')}"
        errors += _unknown_keys(app, ServeApplicationSchema, aw)
        for dep in app.get("deployments") or []:
            errors += _unknown_keys(dep, DeploymentSchema, f"{aw} deployment {dep.get('name')}")
        expected = SERVE_IMPORT_PATHS.get(app.get("name"))
        if expected and app.get("import_path") != expected:
            errors.append(f"{aw}: import_path {app.get('import_path')!r}, expected {expected!r}")
        problem, note = import_path_problem(app.get("import_path", ""))
        errors += [f"{aw}: {problem}"] if problem else []
        notes += [f"{aw}: {note}"] if note else []
    return errors, notes


# The pydantic model each builder validates its ``args`` with.
SERVE_ARG_MODELS = {
    "serve_apps.llm:build_llm_node_app": "serve_apps.llm.config:LLMNodeConfig",
    "serve_apps.diffusion:build_diffusion_app": "cluster.images.config:DiffusionNodeConfig",
    "serve_apps.evaluations:build_evaluations_app":
        "serve_apps.evaluations.config:EvaluationsAppConfig",
}


def serve_args_errors(objects: list[Obj]) -> tuple[list[str], list[str]]:
    """Validate each Serve app's ``args`` with its builder's own config model.

    Slow: importing the builders' packages imports vLLM and diffusers (tens of seconds).
    """
    import importlib

    from pydantic import ValidationError

    errors: list[str] = []
    notes: list[str] = []
    for obj in objects:
        if obj["kind"] != "RayService":
            continue
        for app in serve_apps(str((obj.get("spec") or {}).get("serveConfigV2") or "")):
            aw = f"{obj_id(obj)}: serveConfigV2 app {app.get('name')}"
            target = SERVE_ARG_MODELS.get(app.get("import_path", ""))
            if target is None:
                notes.append(f"{aw}: no config model known for {app.get('import_path')}; "
                             "args not checked")
                continue
            module, _, name = target.partition(":")
            try:
                model = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as exc:
                notes.append(f"{aw}: {target} not importable ({exc}); args not checked")
                continue
            try:
                model.model_validate(app.get("args") or {})
            except ValidationError as exc:
                errors += [f"{aw}: {'.'.join(['args', *map(str, e['loc'])])}: {e['msg']}"
                           for e in exc.errors()]
    return errors, notes


def import_path_problem(import_path: str, repo_root: Path = REPO_ROOT) -> tuple[str | None, str | None]:
    """(error, note): does ``module:attr`` name a top-level definition in this tree?

    Read with ``ast``, not imported: the Serve builders import vLLM. A module that is not in
    the tree yet is a note, not an error (the builders land in their own issues).
    """
    module, sep, attr = import_path.partition(":")
    if not sep:
        module, _, attr = import_path.rpartition(".")
    if not module or not attr:
        return f"import_path {import_path!r} is not module:attribute", None
    base = repo_root.joinpath(*module.split("."))
    source = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
    if source is None:
        return None, f"{module} is not in this tree yet; {attr} not checked"
    tree = ast.parse(source.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if attr in names:
        return None, None
    # A module-level __getattr__ exporting the name lazily (PEP 562), e.g. from a table of
    # {"name": "module"}: accept a name the module spells as a string.
    if "__getattr__" in names and any(isinstance(n, ast.Constant) and n.value == attr
                                      for n in ast.walk(tree)):
        return None, None
    return f"{source.relative_to(repo_root)} defines no {attr}", None


# ---- testbench's own settings and CLI ----------------------------------------------------
_SETTINGS_SPECIAL = {"TESTBENCH_MONGO_URL", "TESTBENCH_POSTGRES_URL", "TESTBENCH_CONFIG"}


def settings_errors(env: dict[str, str], where: str) -> tuple[list[str], list[str]]:
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


_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ";;"}


def shell_steps(script: str) -> list[list[str]]:
    """The simple commands of a shell command line (split at ``&&``, ``||``, ``;``, ``|``)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    steps: list[list[str]] = [[]]
    for token in lexer:
        if token in _SHELL_OPERATORS:
            steps.append([])
        else:
            steps[-1].append(token)
    return [s for s in steps if s]


def entrypoint_errors(entrypoint: str, where: str, kuberay: bool = True) -> tuple[list[str], list[str]]:
    """Parse each ``python -m cluster ...`` step of an entrypoint with the real CLI.

    With ``kuberay``, the entrypoint must be one command: KubeRay pastes it unquoted into
    the submitter pod's shell (``ray job submit ... -- <entrypoint> ; fi``), so a ``&&``
    would run the rest in the submitter pod instead of on the cluster. Wrap several steps
    in ``bash -c '...'``.
    """
    try:
        top = shell_steps(entrypoint)
    except ValueError as exc:
        return [f"{where}: entrypoint: {exc}"], []
    errors: list[str] = []
    if kuberay and len(top) > 1:
        errors.append(f"{where}: entrypoint has several shell commands; KubeRay's submitter "
                      "shell would run all but the first outside Ray: wrap them in bash -c '...'")
    steps: list[list[str]] = []
    for argv in top:
        if argv[0] in ("bash", "sh") and len(argv) >= 3 and argv[1] == "-c":
            try:
                steps.extend(shell_steps(argv[2]))
            except ValueError as exc:
                errors.append(f"{where}: entrypoint script: {exc}")
        else:
            steps.append(argv)
    try:
        from cluster.cli.main import build_parser
    except ImportError as exc:
        return errors, [f"{where}: cluster.cli.main not importable ({exc}); entrypoint not checked"]
    checked = 0
    for argv in steps:
        if argv[:3] == ["python", "-m", "cluster"]:
            args = argv[3:]
        elif argv[:1] == ["testbench"]:
            args = argv[1:]
        else:
            continue
        checked += 1
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                build_parser().parse_args(args)
            except SystemExit:
                errors.append(f"{where}: entrypoint step {shlex.join(argv)!r}: "
                              f"{stderr.getvalue().strip().splitlines()[-1]}")
    notes = [] if checked else [f"{where}: entrypoint runs no testbench command; not checked"]
    return errors, notes


# ---- core objects and cross references ---------------------------------------------------
@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing_secrets: set[str] = field(default_factory=set)  # referenced, not rendered

    def extend(self, result: tuple[list[str], list[str]]) -> None:
        self.errors += result[0]
        self.notes += result[1]


def pod_templates(obj: Obj) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod template in a rendered object."""
    spec = obj.get("spec") or {}
    kind = obj["kind"]
    if kind in ("StatefulSet", "Deployment", "DaemonSet", "Job", "ReplicaSet"):
        yield obj_id(obj), spec.get("template") or {}
    cluster_specs = {"RayCluster": spec, "RayService": spec.get("rayClusterConfig"),
                     "RayJob": spec.get("rayClusterSpec")}.get(kind)
    for name, group in _groups(cluster_specs) if cluster_specs else []:
        yield f"{obj_id(obj)} group {name}", group.get("template") or {}
    if kind == "RayJob" and spec.get("submitterPodTemplate"):
        yield f"{obj_id(obj)} submitter", spec["submitterPodTemplate"]


def _env_sources(objects: list[Obj]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    secrets = {o["metadata"]["name"]: set(o.get("data") or {}) | set(o.get("stringData") or {})
               for o in objects if o["kind"] == "Secret"}
    config_maps = {o["metadata"]["name"]: set(o.get("data") or {}) | set(o.get("binaryData") or {})
                   for o in objects if o["kind"] == "ConfigMap"}
    return secrets, config_maps


def reference_errors(objects: list[Obj], report: Report) -> None:
    secrets, config_maps = _env_sources(objects)
    claims_defined = {o["metadata"]["name"] for o in objects
                      if o["kind"] == "PersistentVolumeClaim"}

    def secret(name: str, key: str | None, where: str, optional: bool) -> None:
        if name not in secrets:
            if not optional:
                report.missing_secrets.add(name)
        elif key is not None and key not in secrets[name] and not optional:
            report.errors.append(f"{where}: Secret {name} has no key {key}")

    def config_map(name: str, key: str | None, where: str, optional: bool) -> None:
        if optional:
            return
        if name not in config_maps:
            report.errors.append(f"{where}: ConfigMap {name} is not defined")
        elif key is not None and key not in config_maps[name]:
            report.errors.append(f"{where}: ConfigMap {name} has no key {key}")

    for obj in objects:
        claims = {(t.get("metadata") or {}).get("name")
                  for t in (obj.get("spec") or {}).get("volumeClaimTemplates") or []}
        for where, template in pod_templates(obj):
            pod = template.get("spec") or {}
            volumes = {v.get("name") for v in pod.get("volumes") or []} | claims
            for v in pod.get("volumes") or []:
                claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is not None and claim not in claims_defined:
                    report.errors.append(f"{where}: volume {v.get('name')}: "
                                         f"PersistentVolumeClaim {claim} is not defined here")
                if "secret" in v:
                    secret(v["secret"].get("secretName"), None, where, v["secret"].get("optional"))
                if "configMap" in v:
                    config_map(v["configMap"].get("name"), None, where, v["configMap"].get("optional"))
            for c in _pod_containers(template):
                cw = f"{where} container {c.get('name')}"
                for e in c.get("env") or []:
                    ref = e.get("valueFrom") or {}
                    if "secretKeyRef" in ref:
                        r = ref["secretKeyRef"]
                        secret(r.get("name"), r.get("key"), f"{cw} env {e.get('name')}",
                               bool(r.get("optional")))
                    if "configMapKeyRef" in ref:
                        r = ref["configMapKeyRef"]
                        config_map(r.get("name"), r.get("key"), f"{cw} env {e.get('name')}",
                                   bool(r.get("optional")))
                for e in c.get("envFrom") or []:
                    if "secretRef" in e:
                        secret(e["secretRef"].get("name"), None, cw, bool(e["secretRef"].get("optional")))
                    if "configMapRef" in e:
                        config_map(e["configMapRef"].get("name"), None, cw,
                                   bool(e["configMapRef"].get("optional")))
                for m in c.get("volumeMounts") or []:
                    if m.get("name") not in volumes:
                        report.errors.append(f"{cw}: volumeMount {m.get('name')} has no volume")


def workload_errors(objects: list[Obj]) -> list[str]:
    errors: list[str] = []
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    templates = [(w, t) for o in objects for w, t in pod_templates(o)]
    for obj in objects:
        spec = obj.get("spec") or {}
        if obj["kind"] == "StatefulSet":
            svc = services.get(spec.get("serviceName"))
            if svc is None:
                errors.append(f"{obj_id(obj)}: serviceName {spec.get('serviceName')!r} is not "
                              "a Service defined here")
            elif (svc.get("spec") or {}).get("clusterIP") != "None":
                errors.append(f"{obj_id(obj)}: governing Service {svc['metadata']['name']} "
                              "is not headless")
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                errors.append(f"{obj_id(obj)}: selector does not match the pod template labels")
            for c in _pod_containers(spec.get("template") or {}):
                res = c.get("resources") or {}
                if not (res.get("requests") or {}).get("memory"):
                    errors.append(f"{obj_id(obj)} container {c.get('name')}: no memory request")
        if obj["kind"] == "Service" and spec.get("selector"):
            selector = spec["selector"]
            pods = [t for _, t in templates
                    if all(((t.get("metadata") or {}).get("labels") or {}).get(k) == v
                           for k, v in selector.items())]
            if not pods:
                errors.append(f"{obj_id(obj)}: selector {selector} matches no pod template here")
            port_names = {p.get("name") for t in pods for c in _pod_containers(t)
                          for p in c.get("ports") or []}
            for p in spec.get("ports") or []:
                target = p.get("targetPort")
                if pods and isinstance(target, str) and target not in port_names:
                    errors.append(f"{obj_id(obj)}: targetPort {target!r} names no container port")
    return errors


def store_url_errors(objects: list[Obj]) -> list[str]:
    """The store URLs must reach a Service defined here (or be external) with the right
    credentials."""
    secrets = {o["metadata"]["name"]: {**(o.get("data") or {}), **(o.get("stringData") or {})}
               for o in objects if o["kind"] == "Secret"}
    if STORE_SECRET not in secrets:
        return []
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    creds = secrets.get(CREDENTIALS_SECRET, {})
    expected = {
        "TESTBENCH_MONGO_URL": (("mongodb",), "MONGO_INITDB_ROOT_USERNAME",
                                "MONGO_INITDB_ROOT_PASSWORD", None),
        "TESTBENCH_POSTGRES_URL": (("postgresql", "postgres"), "POSTGRES_USER",
                                   "POSTGRES_PASSWORD", "POSTGRES_DB"),
    }
    errors = []
    for key, (schemes, user_key, password_key, db_key) in expected.items():
        where = f"Secret/{STORE_SECRET} {key}"
        url = secrets[STORE_SECRET].get(key)
        if not url:
            errors.append(f"{where}: missing (stringData)")
            continue
        parts = urlsplit(str(url))
        if parts.scheme not in schemes:
            errors.append(f"{where}: scheme {parts.scheme!r}, expected {' or '.join(schemes)}")
            continue
        host = parts.hostname or ""
        if "." in host and not host.endswith(".svc") and ".svc." not in host:
            continue  # an external server
        service = services.get(host.split(".")[0])
        if service is None:
            errors.append(f"{where}: host {host!r} is not a Service defined here")
            continue
        ports = {p.get("port") for p in (service.get("spec") or {}).get("ports") or []}
        if parts.port not in ports:
            errors.append(f"{where}: port {parts.port} is not a port of Service {host}")
        if creds:
            if parts.username != creds.get(user_key) or parts.password != creds.get(password_key):
                errors.append(f"{where}: user/password differ from Secret/{CREDENTIALS_SECRET} "
                              f"{user_key}/{password_key}")
            if db_key and parts.path.lstrip("/") != creds.get(db_key):
                errors.append(f"{where}: database {parts.path.lstrip('/')!r} is not "
                              f"{CREDENTIALS_SECRET} {db_key}")
    return errors


def core_schema_errors(objects: list[Obj], report: Report) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        report.notes.append("kubernetes-validate not installed: core objects checked by the "
                            "cross-reference rules only")
        return
    for obj in objects:
        if obj["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(root)"
            report.errors.append(f"{obj_id(obj)}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            report.errors.append(f"{obj_id(obj)}: {exc.message}")


# ---- everything --------------------------------------------------------------------------
def ray_object_errors(obj: Obj, objects: list[Obj], report: Report) -> None:
    kind, spec = obj["kind"], obj.get("spec") or {}
    where = obj_id(obj)
    report.errors.extend(_name_rules(obj))
    if kind == "RayCluster":
        report.errors.extend(ray_cluster_spec_rules(spec, where))
    elif kind == "RayService":
        cluster = spec.get("rayClusterConfig") or {}
        report.errors.extend(ray_cluster_spec_rules(cluster, where))
        if ((cluster.get("headGroupSpec") or {}).get("headService") or {}).get(
                "metadata", {}).get("name"):
            report.errors.append(f"{where}: headService.metadata.name must not be set")
        report.extend(serve_config_errors(spec.get("serveConfigV2"), where))
        if not has_gpus(cluster):
            for app in serve_apps(str(spec.get("serveConfigV2") or "")):
                device = (app.get("args") or {}).get("device")
                if device in GPU_DEVICES:
                    report.errors.append(f"{where}: app {app.get('name')} wants device {device} "
                                         "but no worker group has nvidia.com/gpu")
    elif kind == "RayJob":
        selector = spec.get("clusterSelector") or {}
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in JOB_SUBMISSION_MODES:
            report.errors.append(f"{where}: submissionMode {mode!r} is not one of "
                                 f"{sorted(JOB_SUBMISSION_MODES)}")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            report.errors.append(f"{where}: suspend needs shutdownAfterJobFinishes")
        if spec.get("ttlSecondsAfterFinished") and not spec.get("shutdownAfterJobFinishes"):
            report.errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if not spec.get("rayClusterSpec") and not selector:
            report.errors.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
        if selector:
            cluster = selector.get("ray.io/cluster")
            if not cluster:
                report.errors.append(f"{where}: clusterSelector needs ray.io/cluster")
            elif not any(o["kind"] == "RayCluster" and o["metadata"]["name"] == cluster
                         for o in objects):
                report.errors.append(f"{where}: clusterSelector names RayCluster {cluster!r}, "
                                     "which is not defined here")
            if spec.get("submissionMode") == "SidecarMode":
                report.errors.append(f"{where}: clusterSelector is not supported in SidecarMode")
            if (spec.get("backoffLimit") or 0) > 0:
                report.errors.append(f"{where}: backoffLimit is incompatible with clusterSelector")
        if spec.get("rayClusterSpec"):
            report.errors.extend(ray_cluster_spec_rules(spec["rayClusterSpec"], where))
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if spec.get(key) is not None and spec[key] <= 0:
                report.errors.append(f"{where}: {key} must be positive")
        report.errors.extend(runtime_env_errors(spec.get("runtimeEnvYAML") or "", where))
        report.extend(entrypoint_errors(str(spec.get("entrypoint") or ""), where))


def testbench_env(objects: list[Obj]) -> dict[str, str]:
    """The TESTBENCH_* environment a measuring-loop driver sees: ConfigMaps and Secrets the
    Ray pods load, plus the RayJob's runtime env."""
    env: dict[str, str] = {}
    config_maps = {o["metadata"]["name"]: o.get("data") or {}
                   for o in objects if o["kind"] == "ConfigMap"}
    for obj in objects:
        if not obj["apiVersion"].startswith("ray.io/"):
            continue
        for _, template in pod_templates(obj):
            for c in _pod_containers(template):
                for e in c.get("envFrom") or []:
                    env.update(config_maps.get((e.get("configMapRef") or {}).get("name"), {}))
                for e in c.get("env") or []:
                    if "secretKeyRef" in (e.get("valueFrom") or {}):
                        env[e["name"]] = "postgresql://u:p@host:5432/db" if "POSTGRES" in e[
                            "name"] else "mongodb://u:p@host:27017/"
                    elif "value" in e:
                        env[e["name"]] = str(e["value"])
        if obj["kind"] == "RayJob":
            runtime = yaml.safe_load((obj.get("spec") or {}).get("runtimeEnvYAML") or "") or {}
            if isinstance(runtime, dict):
                env.update({k: str(v) for k, v in (runtime.get("env_vars") or {}).items()})
    return {k: v for k, v in env.items() if k.startswith("TESTBENCH_")}


def check_objects(objects: list[Obj], crd_dir: Path = CRD_DIR, app_args: bool = False) -> Report:
    """Every check on a rendered set of objects; ``app_args`` adds the slow
    ``serve_args_errors``."""
    report = Report()
    for obj in objects:
        if obj.get("apiVersion", "").startswith("ray.io/"):
            if obj["kind"] not in CRD_FILES:
                report.errors.append(f"{obj_id(obj)}: unknown KubeRay kind")
                continue
            if obj["apiVersion"] != RAY_API_VERSION:
                report.errors.append(f"{obj_id(obj)}: apiVersion must be {RAY_API_VERSION}")
            crd_errors = validate_against_crd(obj, crd_dir)
            report.errors.extend(crd_errors)
            if not crd_errors:  # the operator rules assume a schema-valid object
                ray_object_errors(obj, objects, report)
    core_schema_errors(objects, report)
    reference_errors(objects, report)
    report.errors.extend(workload_errors(objects))
    report.errors.extend(store_url_errors(objects))
    report.extend(settings_errors(testbench_env(objects), "TESTBENCH_* settings"))
    if app_args:
        report.extend(serve_args_errors(objects))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path,
                        default=[KUBERAY_DIR / "overlays" / o for o in OVERLAYS],
                        help="kustomization directories (default: the overlays)")
    parser.add_argument("-o", "--output", type=Path,
                        help="also write the rendered YAML of the (single) directory here")
    parser.add_argument("--skip-app-args", action="store_true",
                        help="skip validating Serve app args with the builders' config models "
                        "(that imports vLLM and diffusers: slow)")
    args = parser.parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # cluster.core.settings / cluster.cli.main for the checks
    failed = False
    for directory in args.dirs:
        try:
            objects = render_kustomization(directory)
        except KustomizeError as exc:
            print(f"{directory}: RENDER FAILED: {exc}")
            failed = True
            continue
        if args.output:
            args.output.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        report = check_objects(objects, app_args=not args.skip_app_args)
        status = "FAILED" if report.errors else "ok"
        print(f"{directory}: {len(objects)} objects, {status}")
        for line in report.errors:
            print(f"  error: {line}")
        for line in report.notes:
            print(f"  note:  {line}")
        if report.missing_secrets:
            print(f"  create before applying: Secret {', Secret '.join(sorted(report.missing_secrets))}")
        failed = failed or bool(report.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
