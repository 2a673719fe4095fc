"""A RayService's ``serveConfigV2``: Ray Serve's schema, testbench's builders and their args.

``ServeDeploySchema`` validates the config, and keys it would silently ignore are refused.
Each app's ``import_path`` must name its builder in this tree (read with ``ast``: the
builders import vLLM); ``serve_args_errors`` (slow) validates each app's ``args`` with the
builder's own config model.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import yaml

from infra.kuberay.checks.objects import Obj, has_gpus, obj_id
from infra.kuberay.checks.paths import REPO_ROOT
from infra.kuberay.checks.report import ErrorsAndNotes

GPU_DEVICES = {"gpu", "cuda"}  # LLMNodeConfig/DiffusionNodeConfig/PocNodeConfig.device
# The builder each app's import_path must name (serve_apps/<app>/server.py).
SERVE_IMPORT_PATHS = {
    "llm": "serve_apps.llm:build_llm_node_app",
    "diffusion": "serve_apps.diffusion:build_diffusion_app",
    "evaluations": "serve_apps.evaluations:build_evaluations_app",
    "mlnode": "serve_apps.poc.server:build_poc_node_app",
    "streaming": "serve_apps.streaming.server:build_streaming_app",
}
# The pydantic model each builder validates its ``args`` with.
SERVE_ARG_MODELS = {
    "serve_apps.llm:build_llm_node_app": "serve_apps.llm.config:LLMNodeConfig",
    "serve_apps.diffusion:build_diffusion_app": "cluster.images.config:DiffusionNodeConfig",
    "serve_apps.evaluations:build_evaluations_app":
        "serve_apps.evaluations.config:EvaluationsAppConfig",
    "serve_apps.poc.server:build_poc_node_app": "serve_apps.poc.config:PocNodeConfig",
    "serve_apps.streaming.server:build_streaming_app":
        "serve_apps.streaming.config:StreamingJobConfig",
}


def serve_apps(text: str) -> list[dict[str, Any]]:
    """The ``applications`` of a serveConfigV2 string ([] when it is not a mapping)."""
    config = yaml.safe_load(text) or {}
    return list(config.get("applications") or []) if isinstance(config, dict) else []


def _unknown_keys(data: dict[str, Any], model: Any, where: str) -> list[str]:
    unknown = set(data) - set(model.model_fields)
    return [f"{where}: unknown keys {sorted(unknown)} (Serve would ignore them)"] if unknown else []


def serve_config_errors(text: Any, where: str) -> ErrorsAndNotes:
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


def serve_device_errors(service: Obj) -> list[str]:
    """An app asking for a GPU device on a RayService whose cluster has no GPU worker
    would never schedule."""
    spec = service.get("spec") or {}
    if has_gpus(spec.get("rayClusterConfig") or {}):
        return []
    errors = []
    for app in serve_apps(str(spec.get("serveConfigV2") or "")):
        device = (app.get("args") or {}).get("device")
        if device in GPU_DEVICES:
            errors.append(f"{obj_id(service)}: app {app.get('name')} wants device {device} "
                          "but no worker group has nvidia.com/gpu")
    return errors


def ray_service_serve_errors(service: Obj) -> ErrorsAndNotes:
    """(errors, notes) for one schema-valid RayService's serveConfigV2."""
    errors, notes = serve_config_errors((service.get("spec") or {}).get("serveConfigV2"),
                                        obj_id(service))
    return errors + serve_device_errors(service), notes


def serve_args_errors(objects: list[Obj]) -> ErrorsAndNotes:
    """Validate each Serve app's ``args`` with its builder's own config model.

    Slow: importing the builders' packages imports vLLM and diffusers (tens of seconds).
    """
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


def import_path_problem(import_path: str,
                        repo_root: Path = REPO_ROOT) -> tuple[str | None, str | None]:
    """(error, note): does ``module:attr`` name a top-level definition in this tree?

    Read with ``ast``, not imported: the Serve builders import vLLM. A module that is not in
    the tree yet is a note, not an error.
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
