"""Ray objects against the ``openAPIV3Schema`` of the KubeRay CRDs in ``crds/``.

Read the way the API server reads a manifest with strict field validation: unknown fields
are errors; ``nullable``, ``x-kubernetes-int-or-string``, int32/int64 ranges and unique
``x-kubernetes-list-type: map|set`` entries are honoured. CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from infra.kuberay.checks.objects import Obj, obj_id
from infra.kuberay.checks.paths import CRD_DIR

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
RAY_API_VERSION = "ray.io/v1"
_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

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


def _list_type(validator: Any, list_type: str, instance: Any,
               schema: dict[str, Any]) -> Iterator[Any]:
    """The ``x-kubernetes-list-type`` keyword: no duplicate set items or map keys."""
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
def validator_class() -> Any:
    """Draft 2020-12 plus the ``x-kubernetes-list-type`` keyword."""
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
    """The JSON Schema of a whole ``kind`` object (apiVersion, kind, metadata, spec)."""
    return _crd_json_schema(kind, Path(crd_dir).resolve())


@functools.cache
def _crd_json_schema(kind: str, crd_dir: Path) -> dict[str, Any]:
    path = crd_dir / CRD_FILES[kind]
    crd = yaml.load(path.read_text(), Loader=_LOADER)
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
    return validator_class()(crd_json_schema(kind, crd_dir), format_checker=_format_checker())


def validate_against_crd(obj: Obj, crd_dir: Path = CRD_DIR) -> list[str]:
    """One ``Kind/ns/name: path: message`` per schema violation."""
    validator = crd_validator(obj["kind"], Path(crd_dir).resolve())
    errors = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        errors.append(f"{obj_id(obj)}: {where}: {err.message}")
    return errors


def ray_schema_errors(obj: Obj, crd_dir: Path = CRD_DIR) -> tuple[list[str], bool]:
    """(errors, schema_valid) for a ``ray.io`` object: a KubeRay kind, ``ray.io/v1``, and
    valid against its CRD. The operator rules assume a schema-valid object."""
    if obj["kind"] not in CRD_FILES:
        return [f"{obj_id(obj)}: unknown KubeRay kind"], False
    errors = []
    if obj["apiVersion"] != RAY_API_VERSION:
        errors.append(f"{obj_id(obj)}: apiVersion must be {RAY_API_VERSION}")
    crd_errors = validate_against_crd(obj, crd_dir)
    return errors + crd_errors, not crd_errors
