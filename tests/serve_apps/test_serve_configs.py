"""The Serve config files in serve_apps/configs are valid Serve configs and node configs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.local.models import smollm2_path
from serve_apps.llm import LLMNodeConfig, build_llm_node_app

CONFIGS = Path(__file__).resolve().parents[2] / "serve_apps" / "configs"
LLM_CONFIGS = sorted(CONFIGS.glob("llm_*.yaml"))


def test_the_llm_configs_exist() -> None:
    assert {p.name for p in LLM_CONFIGS} >= {"llm_cpu.yaml", "llm_gpu.yaml"}


@pytest.mark.parametrize("path", LLM_CONFIGS, ids=lambda p: p.name)
def test_config_validates_with_rays_own_schema(path: Path) -> None:
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert [app.route_prefix for app in schema.applications] == ["/"]


@pytest.mark.parametrize("path", LLM_CONFIGS, ids=lambda p: p.name)
def test_config_args_are_an_llm_node_config_for_its_builder(path: Path) -> None:
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text())).applications
    module, _, attr = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attr) is build_llm_node_app
    node = LLMNodeConfig.model_validate(app.args)
    assert node.device == path.stem.removeprefix("llm_")


def test_cpu_config_points_at_the_converted_model_relative_to_the_repo_root() -> None:
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / "llm_cpu.yaml").read_text())).applications
    node = LLMNodeConfig.model_validate(app.args)
    assert node.model_source == "./.cache/models/smollm2"
    repo_root = CONFIGS.parents[1]
    assert (repo_root / node.model_source).resolve() == smollm2_path(repo_root / ".cache")


def test_the_evaluations_config_is_the_evaluations_app_under_evaluations() -> None:
    from serve_apps.evaluations import build_evaluations_app
    from serve_apps.evaluations.config import EvaluationsAppConfig

    (app,) = ServeDeploySchema.model_validate(
        yaml.safe_load((CONFIGS / "evaluations.yaml").read_text())).applications
    assert (app.name, app.route_prefix) == ("evaluations", "/evaluations")
    module, _, attr = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attr) is build_evaluations_app
    config = EvaluationsAppConfig.model_validate(app.args)
    assert config.settings == {} and config.settings_path is None  # settings from the env


# ---- the MLNode and streaming-job apps, as an operator deploys them ------------------------
NODE_CONFIGS = sorted(CONFIGS.glob("mlnode_*.yaml")) + sorted(CONFIGS.glob("streaming_*.yaml"))
ARG_MODELS = {
    "serve_apps.llm:build_llm_node_app": "serve_apps.llm.config:LLMNodeConfig",
    "serve_apps.poc.server:build_poc_node_app": "serve_apps.poc.config:PocNodeConfig",
    "serve_apps.streaming.server:build_streaming_app": "serve_apps.streaming.config:StreamingJobConfig",
}


def test_every_node_app_ships_a_cpu_and_a_gpu_config() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    for app in ("llm", "diffusion", "mlnode", "streaming"):
        assert {f"{app}_cpu.yaml", f"{app}_gpu.yaml"} <= names, app


def _attr(path: str) -> object:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("path", NODE_CONFIGS, ids=lambda p: p.name)
def test_node_app_config_builds_as_serve_run_builds_it(path: Path) -> None:
    """What `serve run FILE` (and a RayService) does before deploying: Ray's schema, each
    app's builder imported from import_path and called with args, the application built
    into its deployments with one FastAPI ingress. The LLM app's args are validated with its
    config (building it imports vLLM; serve_apps/llm has its own tests)."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for app in schema.applications:
        config = _attr(ARG_MODELS[app.import_path]).model_validate(app.args)  # type: ignore[attr-defined]
        if app.import_path.startswith("serve_apps.llm"):
            continue
        built = build_app(call_user_app_builder_with_args_if_necessary(
            import_attr(app.import_path), app.args), name=app.name)
        built.validate_single_fastapi_ingress()
        (deployment,) = built.deployments
        assert deployment.name == config.deployment.name  # type: ignore[attr-defined]
        assert deployment.num_replicas == 1


def test_the_gpu_mlnode_trains_with_nccl_on_gpu_workers_and_the_cpu_one_with_gloo() -> None:
    from serve_apps.poc.config import PocNodeConfig

    def mlnode(name: str) -> PocNodeConfig:
        (app,) = ServeDeploySchema.model_validate(
            yaml.safe_load((CONFIGS / name).read_text())).applications
        return PocNodeConfig.model_validate(app.args)

    gpu, cpu = mlnode("mlnode_gpu.yaml"), mlnode("mlnode_cpu.yaml")
    assert (gpu.training.scaling.backend, gpu.training.scaling.device) == ("nccl", "cuda")
    assert gpu.training.scaling.gpus_per_worker > 0 and gpu.gpus_per_worker > 0
    assert gpu.auth.active  # signed control routes only
    assert (cpu.training.scaling.backend, cpu.training.scaling.device) == ("gloo", "cpu")
    assert cpu.training.node_key_file == Path("data/node.key")
