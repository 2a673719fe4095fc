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
