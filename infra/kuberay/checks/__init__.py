"""Checks of testbench's KubeRay manifests, rendered with the real ``kubectl kustomize``.

One module per concern:

- ``render``: runs ``kubectl kustomize`` and parses its YAML;
- ``crd_schema``: Ray objects against the KubeRay CRDs' ``openAPIV3Schema``;
- ``kuberay_rules``: the operator's own spec rules, the pinned Ray version, runtimeEnvYAML;
- ``serve_config``: ``serveConfigV2`` with Ray Serve's schema and the builders' config models;
- ``entrypoint``: a RayJob entrypoint parsed with testbench's CLI;
- ``settings_env``: the ``TESTBENCH_*`` overrides against ``cluster.core.settings``;
- ``core_schema``: core objects with ``kubernetes-validate``;
- ``references``: Secrets, ConfigMaps, Services, volumes and store URLs refer to each other;
- ``suite``: ``check_objects``, every check on one rendered kustomization.
"""

from infra.kuberay.checks.render import KustomizeError, Rendering, kustomize, render_kustomization
from infra.kuberay.checks.report import Report
from infra.kuberay.checks.suite import check_objects

__all__ = ["KustomizeError", "Rendering", "Report", "check_objects", "kustomize",
           "render_kustomization"]
