"""Cross references among the rendered objects.

Secrets and ConfigMaps (and their keys) that pods load, PersistentVolumeClaims and volume
mounts, StatefulSets' governing Services, Service selectors and target ports, and the store
URLs of the ``testbench-stores`` Secret against the Services and credentials defined here.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from infra.kuberay.checks.objects import Obj, obj_id, pod_containers, pod_templates
from infra.kuberay.checks.report import Report

STORE_SECRET = "testbench-stores"
CREDENTIALS_SECRET = "testbench-store-credentials"


def _env_sources(objects: list[Obj]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({Secret name: keys}, {ConfigMap name: keys})."""
    secrets = {o["metadata"]["name"]: set(o.get("data") or {}) | set(o.get("stringData") or {})
               for o in objects if o["kind"] == "Secret"}
    config_maps = {o["metadata"]["name"]: set(o.get("data") or {}) | set(o.get("binaryData") or {})
                   for o in objects if o["kind"] == "ConfigMap"}
    return secrets, config_maps


def reference_errors(objects: list[Obj], report: Report) -> None:
    """Secrets, ConfigMaps, claims and volumes each pod template refers to. A Secret not
    rendered here is not an error but one to create before applying
    (``report.missing_secrets``)."""
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
            for c in pod_containers(template):
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
    """StatefulSets against their governing Services; Services against the pods they select."""
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
            for c in pod_containers(spec.get("template") or {}):
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
            port_names = {p.get("name") for t in pods for c in pod_containers(t)
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
