"""The KubeRay manifests in infra/kuberay render and validate without a cluster.

infra/kuberay/check_manifests.py renders each kustomization with the real `kubectl kustomize`
and runs the checks of infra/kuberay/checks (the KubeRay CRD schemas, KubeRay's own spec
rules, Ray Serve's ServeDeploySchema, testbench's settings and CLI, core objects and cross
references); these tests run them on both overlays and on mutated copies, so a broken
manifest fails here rather than on a cluster.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.kuberay import check_manifests
from infra.kuberay.checks import crd_schema
from infra.kuberay.checks.entrypoint import entrypoint_errors
from infra.kuberay.checks.objects import containers
from infra.kuberay.checks.paths import OVERLAYS
from infra.kuberay.checks.render import KustomizeError, find_kubectl, render_kustomization
from infra.kuberay.checks.serve_config import import_path_problem, serve_apps, serve_config_errors
from infra.kuberay.checks.suite import check_objects

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "infra" / "kuberay"
IMAGE = "ghcr.io/testbench/testbench"


# ---- helpers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {name: render_kustomization(KUBERAY / "overlays" / name) for name in OVERLAYS}
    out["base"] = render_kustomization(KUBERAY / "base")
    return out


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def groups(cluster_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in cluster_spec.get("workerGroupSpecs", [])}


def errors_of(objects: list[dict[str, Any]]) -> list[str]:
    return check_objects(objects).errors


def assert_rejected(objects: list[dict[str, Any]], pattern: str) -> None:
    errors = errors_of(objects)
    assert any(re.search(pattern, e) for e in errors), (
        f"no error matching {pattern!r}; errors: {errors}")


# ---- the overlays as shipped -------------------------------------------------------------
EXPECTED = {
    "base": {"ConfigMap/testbench-settings", "Secret/testbench-stores",
             "Secret/testbench-store-credentials", "Service/testbench-mongodb",
             "StatefulSet/testbench-mongodb", "Service/testbench-postgres",
             "StatefulSet/testbench-postgres", "PersistentVolumeClaim/testbench-models",
             "PersistentVolumeClaim/testbench-offline-data", "RayCluster/testbench", "RayService/testbench-serve", "RayJob/testbench-loop",
             "Secret/testbench-node-key", "PersistentVolumeClaim/testbench-train",
             "ConfigMap/testbench-train-run", "RayJob/testbench-train"},
}
EXPECTED["cpu-dev"] = EXPECTED["base"] - {"PersistentVolumeClaim/testbench-models"}
EXPECTED["gpu-prod"] = EXPECTED["base"] - {"Secret/testbench-stores",
                                           "Secret/testbench-store-credentials",
                                           "Secret/testbench-node-key"}


@pytest.mark.parametrize("name", ["base", "cpu-dev", "gpu-prod"])
def test_kustomization_renders_the_whole_deployment(rendered, name) -> None:
    objects = rendered[name]
    assert {f"{o['kind']}/{o['metadata']['name']}" for o in objects} == EXPECTED[name]
    if name != "base":
        assert {o["metadata"].get("namespace") for o in objects} == {"testbench"}
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "testbench"
               for o in objects)


@pytest.mark.parametrize("name", ["base", "cpu-dev", "gpu-prod"])
def test_every_manifest_passes_every_check(rendered, name) -> None:
    report = check_objects(rendered[name])
    assert report.errors == []
    # testbench's CLI and Settings took part (kubernetes-validate may be absent: see below).
    assert not [n for n in report.notes if "not importable" in n]


def test_only_gpu_prod_expects_secrets_created_out_of_band(rendered) -> None:
    assert check_objects(rendered["cpu-dev"]).missing_secrets == set()
    assert check_objects(rendered["gpu-prod"]).missing_secrets == {
        "testbench-stores", "testbench-store-credentials", "testbench-node-key"}


@pytest.mark.parametrize("name", ["cpu-dev", "gpu-prod"])
def test_the_mlnode_and_streaming_job_apps_are_deployed_with_the_node_key(rendered, name) -> None:
    from serve_apps.poc.config import PocNodeConfig
    from serve_apps.streaming.config import StreamingJobConfig

    service = one(rendered[name], "RayService")["spec"]
    apps = {a["name"]: a for a in serve_apps(service["serveConfigV2"])}
    mlnode = PocNodeConfig.model_validate(apps["mlnode"]["args"])
    streaming = StreamingJobConfig.model_validate(apps["streaming"]["args"])
    assert (apps["mlnode"]["route_prefix"], apps["streaming"]["route_prefix"]) == ("/mlnode", "/jobs")
    key_file = "/etc/testbench/node-key/node.key"
    assert str(mlnode.training.node_key_file) == str(streaming.signing_key_file) == key_file
    assert str(mlnode.training.output_root) == "/data/train"
    scaling = mlnode.training.scaling
    if name == "gpu-prod":
        assert (scaling.backend, scaling.device, mlnode.device) == ("nccl", "cuda", "cuda")
        assert mlnode.auth.active and streaming.auth.active
    else:
        assert (scaling.backend, scaling.device, mlnode.device) == ("gloo", "cpu", "cpu")
    # every Serve pod (replicas of 0-CPU ingresses may land on the head) has the key and
    # the training volume
    cluster = service["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        mounts = {m["mountPath"] for c in template["spec"]["containers"]
                  for m in c.get("volumeMounts", [])}
        assert {"/etc/testbench/node-key", "/data/train"} <= mounts


@pytest.mark.parametrize("name", ["cpu-dev", "gpu-prod"])
def test_the_training_rayjob_is_suspended_and_runs_the_real_cli(rendered, name) -> None:
    job = one(rendered[name], "RayJob", "testbench-train")["spec"]
    assert job["suspend"] is True and job["shutdownAfterJobFinishes"] is True
    assert job["entrypoint"].startswith("python -m cluster train run --config /config/run.yaml")
    assert entrypoint_errors(job["entrypoint"], "job") == ([], [])
    from cluster.train.config import TrainRunConfig

    config_map = one(rendered[name], "ConfigMap", "testbench-train-run")
    run = TrainRunConfig.model_validate(yaml.safe_load(config_map["data"]["run.yaml"]))
    assert run.peers == [] and run.output_dir.startswith("/data/train/")
    gpu = "nvidia.com/gpu" in yaml.safe_dump(job["rayClusterSpec"])
    assert gpu == (name == "gpu-prod") and ("--backend nccl" in job["entrypoint"]) == gpu


def test_cpu_dev_asks_for_no_gpu_and_runs_the_cpu_image(rendered) -> None:
    objects = rendered["cpu-dev"]
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(objects)
    assert set(groups(one(objects, "RayCluster")["spec"])) == {"cpu-actors"}
    service = one(objects, "RayService")["spec"]
    assert set(groups(service["rayClusterConfig"])) == {"cpu-serve"}
    apps = {a["name"]: a for a in serve_apps(service["serveConfigV2"])}
    assert apps["llm"]["args"]["device"] == "cpu"
    assert apps["diffusion"]["args"]["device"] == "cpu"
    images = {c["image"] for o in objects for c in containers(o) if IMAGE in c["image"]}
    assert images == {f"{IMAGE}:0.1.0-cpu"}


def test_gpu_prod_serves_models_on_gpu_workers(rendered) -> None:
    objects = rendered["gpu-prod"]
    service = one(objects, "RayService")["spec"]
    gpu = groups(service["rayClusterConfig"])["gpu-serve"]
    assert gpu["replicas"] >= 1
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in worker["volumeMounts"]
    apps = {a["name"]: a for a in serve_apps(service["serveConfigV2"])}
    assert apps["llm"]["args"] == {"model_id": "smollm2",
                                   "model_source": "/app/.cache/models/smollm2", "device": "gpu"}
    assert apps["diffusion"]["args"]["device"] == "cuda"
    assert groups(one(objects, "RayCluster")["spec"])["cpu-actors"]["replicas"] == 4


OFFLINE_MOUNT = {"name": "offline-data", "mountPath": "/data/offline", "readOnly": True}


@pytest.mark.parametrize("name", ["cpu-dev", "gpu-prod"])
def test_both_clusters_read_tasks_from_the_offline_data_volume(rendered, name) -> None:
    """The RayJob's driver (the loop cluster's head), the loop's workers and the evaluations
    app's pods (the Serve cluster's head and CPU workers) mount the claim read-only at the
    directory the settings name."""
    objects = rendered[name]
    claim = one(objects, "PersistentVolumeClaim", "testbench-offline-data")["spec"]
    assert claim["accessModes"] == (["ReadWriteOnce"] if name == "cpu-dev"
                                    else ["ReadWriteMany"])
    loop = one(objects, "RayCluster")["spec"]
    serve = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [loop["headGroupSpec"], groups(loop)["cpu-actors"],
            serve["headGroupSpec"], groups(serve)["cpu-serve"]]
    for group in pods:
        spec = group["template"]["spec"]
        assert OFFLINE_MOUNT in spec["containers"][0]["volumeMounts"]
        assert {"name": "offline-data", "persistentVolumeClaim": {
            "claimName": "testbench-offline-data", "readOnly": True}} in spec["volumes"]
    settings = one(objects, "ConfigMap", "testbench-settings")["data"]
    assert settings["TESTBENCH_TASKS_SOURCES__OFFLINE_DATA_DIR"] == "/data/offline"
    assert one(objects, "RayJob", "testbench-loop")["spec"]["clusterSelector"] == {"ray.io/cluster": "testbench"}


def test_the_loop_job_targets_the_loop_cluster_with_the_real_cli(rendered) -> None:
    job = one(rendered["cpu-dev"], "RayJob", "testbench-loop")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": "testbench"}
    assert "python -m cluster run --until-full" in job["entrypoint"]
    assert entrypoint_errors(job["entrypoint"], "job") == ([], [])


def _sections(output: str) -> dict[str, list[str]]:
    """check_manifests.py's output, per directory: {"DIR: N objects, ok": [lines...]}."""
    sections: dict[str, list[str]] = {}
    for line in output.splitlines():
        if line.startswith(" "):
            sections[list(sections)[-1]].append(line.strip())
        elif line:
            sections[line] = []
    return sections


@pytest.mark.slow
def test_serve_app_args_are_valid_configs_of_their_builders(tmp_path) -> None:
    """Each app's args validate with LLMNodeConfig / DiffusionNodeConfig. Run as the CLI in
    a child process: importing the builders imports vLLM and diffusers."""
    broken = tmp_path / "kuberay"
    shutil.copytree(KUBERAY, broken, ignore=shutil.ignore_patterns("crds", "__pycache__"))
    patch = broken / "overlays" / "cpu-dev" / "rayservice.yaml"
    patch.write_text(patch.read_text().replace("model_id: smollm2", "model_idd: smollm2")
                     .replace("        args:\n          device: cpu\n",
                              "        args:\n          device: cpu\n          dtype: float16\n"))
    dirs = [KUBERAY / "overlays" / "cpu-dev", KUBERAY / "overlays" / "gpu-prod",
            broken / "overlays" / "cpu-dev"]
    out = subprocess.run([sys.executable, str(KUBERAY / "check_manifests.py"), *map(str, dirs)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert "not importable" not in out.stdout, out.stdout
    good_dev, good_prod, bad = _sections(out.stdout).items()
    assert good_dev[0].endswith("ok") and not [x for x in good_dev[1] if x.startswith("error")]
    assert good_prod[0].endswith("ok") and not [x for x in good_prod[1] if x.startswith("error")]
    assert bad[0].endswith("FAILED") and out.returncode == 1
    assert any("app llm: args.model_idd: Extra inputs are not permitted" in x for x in bad[1])
    assert any("app diffusion: args: Value error, dtype float16 needs device cuda" in x
               for x in bad[1]), bad[1]


# ---- rendering with kubectl kustomize ---------------------------------------------------
def test_kubectl_next_to_python_comes_before_the_one_on_path(tmp_path) -> None:
    venv_bin, on_path = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    for directory in (venv_bin, on_path):
        directory.mkdir(parents=True)
        (directory / "kubectl").write_text("#!/bin/sh\n")
        (directory / "kubectl").chmod(0o755)
    python = venv_bin / "python"
    assert find_kubectl(python, path=str(on_path)) == venv_bin / "kubectl"
    (venv_bin / "kubectl").unlink()
    assert find_kubectl(python, path=str(on_path)) == on_path / "kubectl"


def test_a_missing_kubectl_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(KustomizeError, match=r"kubectl not found next to .* nor on PATH: "
                                             r"install the project's test extra"):
        find_kubectl(tmp_path / "python", path=str(tmp_path))


# ---- CRD schema validation rejects broken Ray objects ------------------------------------
@pytest.mark.parametrize("kind", sorted(crd_schema.CRD_FILES))
def test_crd_schemas_convert_to_valid_json_schemas(kind) -> None:
    crd_schema.validator_class().check_schema(crd_schema.crd_json_schema(kind))


def _mutate_cluster(objects, fn) -> list[dict[str, Any]]:
    objects = copy.deepcopy(objects)
    fn(one(objects, "RayCluster")["spec"])
    return objects


CRD_BREAKAGES = {
    "unknown field": (lambda s: s["workerGroupSpecs"][0].update(replica=1),
                      r"workerGroupSpecs\.0: .*'replica' was unexpected"),
    "wrong type": (lambda s: s["workerGroupSpecs"][0].update(maxReplicas="eight"),
                   r"workerGroupSpecs\.0\.maxReplicas: 'eight' is not of type 'integer'"),
    "missing required": (lambda s: s["workerGroupSpecs"][0].pop("groupName"),
                         r"'groupName' is a required property"),
    "int32 overflow": (lambda s: s["workerGroupSpecs"][0].update(maxReplicas=2**31),
                       r"maxReplicas: 2147483648 is not a 'int32'"),
    "duplicate env name": (
        lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "TESTBENCH_MONGO_URL", "value": "x"}),
        r"duplicate entries for key \(name=TESTBENCH_MONGO_URL\)"),
    "bad quantity": (
        lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
            "limits"].update(memory="3 GB"), r"resources\.limits\.memory: '3 GB' does not match"),
    "unknown pod field": (lambda s: s["headGroupSpec"]["template"]["spec"].update(
        tolerances=[]), r"'tolerances' was unexpected"),
    "rayStartParams not strings": (
        lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        r"rayStartParams\.num-cpus: 0 is not of type 'string'"),
}


@pytest.mark.parametrize("breakage", sorted(CRD_BREAKAGES))
def test_crd_validation_rejects_a_broken_raycluster(rendered, breakage) -> None:
    fn, pattern = CRD_BREAKAGES[breakage]
    assert_rejected(_mutate_cluster(rendered["cpu-dev"], fn), pattern)


def test_crd_validation_rejects_bad_metadata_status_and_api_version(rendered) -> None:
    objects = copy.deepcopy(rendered["cpu-dev"])
    job = one(objects, "RayJob", "testbench-loop")
    job["metadata"]["labels"]["team"] = "not a label value!"
    job["status"] = {"jobStatus": "RUNNING"}
    assert_rejected(objects, r"metadata\.labels\.team: 'not a label value!' does not match")
    assert_rejected(objects, r"testbench-loop: \(root\): .*'status' was unexpected")
    objects = copy.deepcopy(rendered["cpu-dev"])
    one(objects, "RayJob", "testbench-loop")["spec"]["submissionMode"] = "K8sMode"  # the CRD has no enum here
    assert_rejected(objects, r"submissionMode 'K8sMode' is not one of")
    one(objects, "RayService")["apiVersion"] = "ray.io/v1alpha1"
    assert_rejected(objects, r"RayService/testbench/testbench-serve: apiVersion must be ray.io/v1")


# ---- KubeRay's own rules -----------------------------------------------------------------
KUBERAY_BREAKAGES = {
    "min above max": (lambda s: s["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=2),
                      r"minReplicas 3 > maxReplicas 2"),
    "replicas out of bounds": (lambda s: s["workerGroupSpecs"][0].update(replicas=9),
                               r"replicas 9 outside \[1, 2\]"),
    "ray version": (lambda s: s.update(rayVersion="2.59.0"),
                    r"rayVersion '2.59.0' is not the pinned ray==2.60.0"),
    "mixed images": (lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                     .update(image=f"{IMAGE}:0.0.9"), r"different images"),
    "duplicate group": (lambda s: s["workerGroupSpecs"].append(
        copy.deepcopy(s["workerGroupSpecs"][0])), r"worker group cpu-actors: duplicate"),
    "no requests": (lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                    .pop("resources"), r"requests no cpu or memory"),
}


@pytest.mark.parametrize("breakage", sorted(KUBERAY_BREAKAGES))
def test_kuberay_rules_reject_a_broken_raycluster(rendered, breakage) -> None:
    fn, pattern = KUBERAY_BREAKAGES[breakage]
    assert_rejected(_mutate_cluster(rendered["cpu-dev"], fn), pattern)


def test_kuberay_rules_reject_a_job_without_its_cluster_and_long_names(rendered) -> None:
    objects = copy.deepcopy(rendered["cpu-dev"])
    one(objects, "RayJob", "testbench-loop")["spec"]["clusterSelector"] = {"ray.io/cluster": "elsewhere"}
    one(objects, "RayService")["metadata"]["name"] = "s" * 48
    assert_rejected(objects, r"clusterSelector names RayCluster 'elsewhere', which is not defined")
    assert_rejected(objects, r"name longer than 47 characters")
    one(objects, "RayJob", "testbench-loop")["spec"].pop("clusterSelector")
    assert_rejected(objects, r"one of rayClusterSpec or clusterSelector must be set")


def test_gpu_apps_without_gpu_workers_are_rejected(rendered) -> None:
    """The base's GPU serve config on cpu-dev's cluster would never schedule."""
    objects = copy.deepcopy(rendered["cpu-dev"])
    base_config = one(rendered["base"], "RayService")["spec"]["serveConfigV2"]
    one(objects, "RayService")["spec"]["serveConfigV2"] = base_config
    assert_rejected(objects, r"app llm wants device gpu but no worker group has nvidia.com/gpu")
    assert_rejected(objects, r"app diffusion wants device cuda")


# ---- serveConfigV2, runtime env, entrypoint, settings ------------------------------------
def _with_serve_config(rendered, edit) -> list[dict[str, Any]]:
    objects = copy.deepcopy(rendered["cpu-dev"])
    service = one(objects, "RayService")["spec"]
    config = yaml.safe_load(service["serveConfigV2"])
    edit(config)
    service["serveConfigV2"] = yaml.safe_dump(config)
    return objects


SERVE_BREAKAGES = {
    "duplicate route": (lambda c: c["applications"][1].update(route_prefix="/"),
                        r"serveConfigV2: applications: .*route prefix"),
    "no import path": (lambda c: c["applications"][0].pop("import_path"),
                       r"serveConfigV2: applications\.0\.import_path: Field required"),
    "misspelt key": (lambda c: c["applications"][0].update(arg=c["applications"][0].pop("args")),
                     r"app llm: unknown keys \['arg'\]"),
    "wrong builder": (lambda c: c["applications"][0].update(
        import_path="serve_apps.llm:build_llm_app"),
        r"app llm: import_path 'serve_apps.llm:build_llm_app', expected"),
    "unknown top-level key": (lambda c: c.update(http_option={}),
                              r"serveConfigV2: unknown keys \['http_option'\]"),
}


@pytest.mark.parametrize("breakage", sorted(SERVE_BREAKAGES))
def test_serve_config_checks_reject_a_broken_serve_config(rendered, breakage) -> None:
    edit, pattern = SERVE_BREAKAGES[breakage]
    assert_rejected(_with_serve_config(rendered, edit), pattern)


def test_serve_config_must_be_a_yaml_mapping_string() -> None:
    assert serve_config_errors("- a\n- b\n", "x")[0] == [
        "x: serveConfigV2 must be a YAML mapping"]
    assert serve_config_errors({"applications": []}, "x")[0] == [
        "x: serveConfigV2 must be a YAML string"]


def test_import_paths_are_resolved_in_the_source_tree() -> None:
    assert import_path_problem("cluster.cli.main:build_parser") == (None, None)
    error, _ = import_path_problem("cluster.cli.main:no_such_builder")
    assert error == "cluster/cli/main.py defines no no_such_builder"
    error, note = import_path_problem("serve_apps.not_yet:build")
    assert error is None and "not in this tree yet" in note


def test_import_paths_accept_lazy_module_exports(tmp_path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "_EXPORTS = {'build_app': 'pkg.builder'}\n\n"
        "def __getattr__(name):\n    raise AttributeError(name)\n")
    assert import_path_problem("pkg:build_app", tmp_path) == (None, None)
    assert import_path_problem("pkg:build_other", tmp_path)[0] == (
        "pkg/__init__.py defines no build_other")


def test_runtime_env_and_entrypoint_errors_are_reported(rendered) -> None:
    objects = copy.deepcopy(rendered["cpu-dev"])
    job = one(objects, "RayJob", "testbench-loop")["spec"]
    job["runtimeEnvYAML"] = "env_vars:\n  TESTBENCH_POOLS__SAMPLERS: 4\n"
    job["entrypoint"] = "bash -c 'python -m cluster datasets load; python -m cluster run --until-fill'"
    assert_rejected(objects, r"runtimeEnvYAML: runtime_env\['env_vars'\] must be of type")
    assert_rejected(objects, r"entrypoint step 'python -m cluster run --until-fill': .*unrecognized")
    job["entrypoint"] = "python -m cluster datasets lod"
    assert_rejected(objects, r"entrypoint step 'python -m cluster datasets lod': .*invalid choice")
    job["runtimeEnvYAML"] = "env_var: {}\n"
    assert_rejected(objects, r"runtimeEnvYAML: unknown fields \['env_var'\]")


def test_a_job_entrypoint_must_be_one_command_for_the_submitter_shell(rendered) -> None:
    objects = copy.deepcopy(rendered["cpu-dev"])
    one(objects, "RayJob", "testbench-loop")["spec"]["entrypoint"] = (
        "python -m cluster datasets load && python -m cluster run --until-full")
    assert_rejected(objects, r"entrypoint has several shell commands; .*wrap them in bash -c")
    assert entrypoint_errors("python -m cluster datasets load && python -m cluster run",
                                "by hand", kuberay=False) == ([], [])


SETTINGS_BREAKAGES = {
    "unknown field": ({"TESTBENCH_POOLS__SAMPLER": "2"}, r"overrides rejected by Settings"),
    "bad value": ({"TESTBENCH_MANAGER__TARGET_SAMPLES": "many"}, r"overrides rejected by Settings"),
    "no section separator": ({"TESTBENCH_POOLS_SAMPLERS": "2"}, r"TESTBENCH_POOLS_SAMPLERS is ignored"),
}


@pytest.mark.parametrize("breakage", sorted(SETTINGS_BREAKAGES))
def test_settings_overrides_must_name_real_settings(rendered, breakage) -> None:
    data, pattern = SETTINGS_BREAKAGES[breakage]
    objects = copy.deepcopy(rendered["cpu-dev"])
    one(objects, "ConfigMap", "testbench-settings")["data"].update(data)
    assert_rejected(objects, pattern)


# ---- core objects and cross references ---------------------------------------------------
def _statefulset(objects, name="testbench-postgres") -> dict[str, Any]:
    return one(objects, "StatefulSet", name)["spec"]


CORE_BREAKAGES = {
    "serviceName": (lambda o: _statefulset(o).update(serviceName="postgres"),
                    r"serviceName 'postgres' is not a Service defined here"),
    "selector": (lambda o: one(o, "Service", "testbench-mongodb")["spec"]["selector"].update(
        {"app.kubernetes.io/name": "mongo"}), r"Service/testbench/testbench-mongodb: selector"),
    "volume mount": (lambda o: _statefulset(o)["template"]["spec"]["containers"][0][
        "volumeMounts"][0].update(name="pgdata"), r"volumeMount pgdata has no volume"),
    "secret key": (lambda o: one(o, "Secret", "testbench-stores")["stringData"].pop(
        "TESTBENCH_MONGO_URL"), r"Secret testbench-stores has no key TESTBENCH_MONGO_URL"),
    "config map": (lambda o: o.remove(one(o, "ConfigMap", "testbench-settings")),
                   r"ConfigMap testbench-settings is not defined"),
    "store password": (lambda o: one(o, "Secret", "testbench-store-credentials")[
        "stringData"].update(POSTGRES_PASSWORD="other"),
        r"TESTBENCH_POSTGRES_URL: user/password differ"),
    "store port": (lambda o: one(o, "Secret", "testbench-stores")["stringData"].update(
        TESTBENCH_MONGO_URL="mongodb://testbench:testbench-dev-password@testbench-mongodb:27018/"),
        r"port 27018 is not a port of Service testbench-mongodb"),
    "target port": (lambda o: one(o, "Service", "testbench-postgres")["spec"]["ports"][0].update(
        targetPort="pg"), r"targetPort 'pg' names no container port"),
    "claim": (lambda o: o.remove(one(o, "PersistentVolumeClaim", "testbench-models")),
              r"PersistentVolumeClaim testbench-models is not defined here"),
    "offline data claim": (
        lambda o: o.remove(one(o, "PersistentVolumeClaim", "testbench-offline-data")),
        r"PersistentVolumeClaim testbench-offline-data is not defined here"),
}


@pytest.mark.parametrize("breakage", sorted(CORE_BREAKAGES))
def test_reference_checks_reject_broken_core_objects(rendered, breakage) -> None:
    fn, pattern = CORE_BREAKAGES[breakage]
    objects = copy.deepcopy(rendered["cpu-dev" if breakage != "claim" else "gpu-prod"])
    fn(objects)
    assert_rejected(objects, pattern)


def test_external_store_urls_are_accepted(rendered) -> None:
    objects = copy.deepcopy(rendered["cpu-dev"])
    one(objects, "Secret", "testbench-stores")["stringData"].update(
        TESTBENCH_MONGO_URL="mongodb+srv://u:p@cluster0.example.net/?retryWrites=true",
        TESTBENCH_POSTGRES_URL="postgresql://u:p@db.example.net:5432/testbench")
    assert_rejected(objects, r"TESTBENCH_MONGO_URL: scheme 'mongodb\+srv'")
    one(objects, "Secret", "testbench-stores")["stringData"][
        "TESTBENCH_MONGO_URL"] = "mongodb://u:p@mongo.example.net:27017/"
    assert errors_of(objects) == []


def test_core_objects_are_validated_against_kubernetes_schemas(rendered) -> None:
    import kubernetes_validate  # noqa: F401  (the test extra installs it)
    objects = copy.deepcopy(rendered["cpu-dev"])
    _statefulset(objects)["replicas"] = "1"
    assert_rejected(objects, r"StatefulSet/testbench/testbench-postgres: spec\.replicas: '1'")
    objects = copy.deepcopy(rendered["cpu-dev"])
    one(objects, "Service", "testbench-mongodb")["spec"]["clusterIp"] = "None"
    assert_rejected(objects, r"Service/testbench/testbench-mongodb: .*clusterIp")


# ---- an invalid kustomization fails with kubectl's own message ---------------------------
def _write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


CONFIG_MAP = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: '1', l: x}\n"


@pytest.mark.parametrize(("kustomization", "extra", "pattern"), [
    ("commonLabel: {a: b}\nresources: [cm.yaml]\n", {},
     r"invalid Kustomization: json: unknown field \"commonLabel\""),
    ("resources: [cm.yaml\n", {}, r"invalid Kustomization: yaml: line 1"),
    ("resources: [cm.yaml, cm.yaml]\n", {},
     r"may not add resource with an already registered id: ConfigMap\.v1\.\[noGrp\]/c"),
    ("resources: [missing.yaml]\n", {}, r"missing\.yaml: no such file or directory"),
    ("resources: [cm.yaml]\npatches:\n- {path: p.yaml, target: {kind: ConfigMap}}\n",
     {"p.yaml": "- {op: test, path: /data/a, value: '2'}\n"},
     r"testing value /data/a failed: test failed"),
    ("resources: [cm.yaml]\npatches:\n- path: p.yaml\n",
     {"p.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: [1]\n"},
     r"wrong node kind: expected MappingNode but got SequenceNode"),
    ("resources: [cm.yaml]\npatches:\n- path: p.yaml\n",
     {"p.yaml": "$patch: delete\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n"
                "$patch: delete\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: d}\n"},
     r"no resource matches strategic merge patch \"ConfigMap\.v1\.\[noGrp\]/d"),
])
def test_an_invalid_kustomization_fails_with_kubectls_error(
        tmp_path, kustomization, extra, pattern) -> None:
    _write(tmp_path, {"kustomization.yaml": kustomization, "cm.yaml": CONFIG_MAP, **extra})
    with pytest.raises(KustomizeError, match=pattern):
        render_kustomization(tmp_path)


def test_a_directory_without_a_kustomization_fails_the_cli(tmp_path, capsys) -> None:
    assert check_manifests.main([str(tmp_path), "--skip-app-args"]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path}: RENDER FAILED: kubectl kustomize {tmp_path}: unable to find one of " in out


def test_renderer_applies_patches_namespace_labels_and_images(tmp_path) -> None:
    _write(tmp_path / "base", {
        "kustomization.yaml": "resources: [cm.yaml, pod.yaml]\n",
        "cm.yaml": CONFIG_MAP,
        "pod.yaml": "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n"
                    "  - {name: a, image: 'reg:5000/x/app:1.0'}\n"
                    "  initContainers:\n  - {name: b, image: 'reg:5000/x/app@sha256:00'}\n",
    })
    _write(tmp_path / "overlay", {
        "kustomization.yaml": (
            "namespace: ns\nresources: [../base]\nlabels:\n- pairs: {team: ml}\n"
            "images:\n- {name: 'reg:5000/x/app', newName: other/app, newTag: '2.0'}\n"
            "patches:\n- path: p.yaml\n  target: {kind: ConfigMap, name: 'c|d'}\n"
            "- patch: |-\n    apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: c}\n"
            "    data: {a: null, n: {x: 1}}\n"),
        "p.yaml": "- {op: add, path: /data/z, value: '3'}\n- {op: remove, path: /data/l}\n",
    })
    cm, pod = render_kustomization(tmp_path / "overlay")
    assert cm["data"] == {"z": "3", "n": {"x": 1}}
    assert cm["metadata"] == {"name": "c", "namespace": "ns", "labels": {"team": "ml"}}
    assert [c["image"] for c in containers(pod)] == ["other/app:2.0", "other/app:2.0"]


# ---- a broken manifest on disk fails the checks ------------------------------------------
@pytest.fixture
def kuberay_copy(tmp_path) -> Path:
    target = tmp_path / "kuberay"
    shutil.copytree(KUBERAY, target, ignore=shutil.ignore_patterns("crds", "__pycache__"))
    return target


def test_a_broken_base_manifest_fails_the_overlay_checks(kuberay_copy, capsys) -> None:
    raycluster = kuberay_copy / "base" / "raycluster.yaml"
    raycluster.write_text(raycluster.read_text().replace("upscalingMode: Default",
                                                         "upscalingMode: Fast"))
    report = check_objects(render_kustomization(kuberay_copy / "overlays" / "gpu-prod"))
    assert any("autoscalerOptions.upscalingMode: 'Fast' is not one of" in e
               for e in report.errors), report.errors
    assert check_manifests.main([str(kuberay_copy / "overlays" / "gpu-prod"), "--skip-app-args"]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert check_manifests.main([str(KUBERAY / "overlays" / "cpu-dev"), "--skip-app-args"]) == 0


def test_a_reordered_worker_group_fails_the_overlay_build(kuberay_copy) -> None:
    """The overlays' JSON 6902 `test` guards stop a patch from hitting the wrong group."""
    raycluster = kuberay_copy / "base" / "raycluster.yaml"
    raycluster.write_text(raycluster.read_text().replace("groupName: gpu-serve",
                                                         "groupName: gpu-workers"))
    overlay = kuberay_copy / "overlays" / "cpu-dev"
    with pytest.raises(KustomizeError,
                       match=r"testing value /spec/workerGroupSpecs/1/groupName failed: test failed"):
        render_kustomization(overlay)


# ---- the image ---------------------------------------------------------------------------
def test_dockerfile_builds_the_extras_and_python_the_project_declares() -> None:
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    python = re.search(r"ARG PYTHON_VERSION=(\S+)", dockerfile).group(1)
    assert re.fullmatch(r">=\s*" + re.escape(python) + r"\b.*", project["requires-python"])
    variants = set(re.findall(r"^\s+(\w+)\) pip install", dockerfile, flags=re.M))
    assert variants == {"cpu", "gpu"} <= set(project["optional-dependencies"])
    assert 'pip install -c constraints.txt -e ".[cpu]"' in dockerfile
    assert 'pip install -e ".[gpu]"' in dockerfile
    for tag in ("0.1.0", "0.1.0-cpu"):
        assert f"-t {IMAGE}:{tag} ." in dockerfile
