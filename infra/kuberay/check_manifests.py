"""Render and check testbench's KubeRay manifests without a Kubernetes cluster.

    python infra/kuberay/check_manifests.py [KUSTOMIZATION_DIR ...]

(default: both overlays). Each directory is rendered with the real ``kubectl kustomize``
(kubectl next to this Python first, then on PATH), then every check of
``infra/kuberay/checks`` runs on the result: the KubeRay CRD schemas and the operator's own
rules, ``serveConfigV2``, runtimeEnvYAML, the RayJob entrypoint, the ``TESTBENCH_*``
settings, core objects and cross references.

Exit status: 0 when every directory renders and passes every check, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: infra/ and cluster/ import from here
    sys.path.insert(0, str(REPO_ROOT))

from infra.kuberay.checks import KustomizeError, Report, check_objects, kustomize  # noqa: E402
from infra.kuberay.checks.paths import OVERLAY_DIRS  # noqa: E402


def print_report(directory: Path, object_count: int, report: Report) -> None:
    print(f"{directory}: {object_count} objects, {'FAILED' if report.errors else 'ok'}")
    for line in report.errors:
        print(f"  error: {line}")
    for line in report.notes:
        print(f"  note:  {line}")
    if report.missing_secrets:
        print(f"  create before applying: Secret {', Secret '.join(sorted(report.missing_secrets))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, default=list(OVERLAY_DIRS),
                        help="kustomization directories (default: the overlays)")
    parser.add_argument("-o", "--output", type=Path,
                        help="also write the rendered YAML of the (single) directory here")
    parser.add_argument("--skip-app-args", action="store_true",
                        help="skip validating Serve app args with the builders' config models "
                        "(that imports vLLM and diffusers: slow)")
    args = parser.parse_args(argv)
    failed = False
    for directory in args.dirs:
        try:
            rendering = kustomize(directory)
        except KustomizeError as exc:
            print(f"{directory}: RENDER FAILED: {exc}")
            failed = True
            continue
        if args.output:
            args.output.write_text(rendering.yaml_text)
        report = check_objects(rendering.objects, app_args=not args.skip_app_args)
        report.notes += [f"kubectl kustomize: {warning}" for warning in rendering.warnings]
        print_report(directory, len(rendering.objects), report)
        failed = failed or bool(report.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
