"""Where the manifests, the KubeRay CRDs and the project's sources are."""

from __future__ import annotations

from pathlib import Path

KUBERAY_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = KUBERAY_DIR.parents[1]
CRD_DIR = KUBERAY_DIR / "crds"
OVERLAYS = ("cpu-dev", "gpu-prod")
OVERLAY_DIRS = tuple(KUBERAY_DIR / "overlays" / name for name in OVERLAYS)
