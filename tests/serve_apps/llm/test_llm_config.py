"""LLMNodeConfig: validation and the Ray Serve LLM config it maps to, per device."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_apps.llm import LLMNodeConfig


def test_minimal_cpu_config_gets_the_cpu_engine_settings() -> None:
    llm = LLMNodeConfig(model_id="smollm2", model_source="/models/smollm2").to_llm_config()
    assert llm.model_id == "smollm2"
    assert llm.model_loading_config.model_source == "/models/smollm2"
    assert llm.placement_group_config == {"bundles": [{"CPU": 1.0}], "strategy": "PACK"}
    assert llm.accelerator_config.kind == "cpu"
    assert llm.engine_kwargs == {"enforce_eager": True, "dtype": "auto"}
    assert llm.runtime_env == {"env_vars": {"TORCH_COMPILE_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}}
    assert llm.deployment_config == {"num_replicas": 1}


def test_gpu_config_places_one_gpu_per_tensor_parallel_worker() -> None:
    node = LLMNodeConfig(
        model_id="m",
        model_source="HuggingFaceTB/SmolLM2-135M-Instruct",
        device="gpu",
        dtype="bfloat16",
        max_model_len=4096,
        tensor_parallel_size=2,
        cpus_per_worker=2,
        accelerator_type="L4",
        num_replicas=3,
        engine_kwargs={"gpu_memory_utilization": 0.5},
    )
    llm = node.to_llm_config()
    assert llm.placement_group_config == {"bundles": [{"GPU": 1, "CPU": 2.0}] * 2, "strategy": "PACK"}
    assert llm.accelerator_config.kind == "gpu" and llm.accelerator_type == "L4"
    assert llm.model_loading_config.model_source == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert llm.engine_kwargs == {
        "dtype": "bfloat16",
        "max_model_len": 4096,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5,
    }
    assert llm.runtime_env == {"env_vars": {}}
    assert llm.deployment_config == {"num_replicas": 3}


def test_engine_kwargs_and_env_vars_override_the_cpu_defaults() -> None:
    node = LLMNodeConfig(
        model_id="m",
        model_source="/m",
        engine_kwargs={"enforce_eager": False, "seed": 7},
        env_vars={"TORCH_COMPILE_DISABLE": "0", "HF_HUB_OFFLINE": "1"},
        kv_cache_space_gib=3,
    )
    assert node.resolved_engine_kwargs() == {"enforce_eager": False, "dtype": "auto", "seed": 7}
    assert node.engine_env_vars() == {
        "TORCH_COMPILE_DISABLE": "0",
        "VLLM_CPU_KVCACHE_SPACE": "3",
        "HF_HUB_OFFLINE": "1",
    }


def test_relative_local_model_source_becomes_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    node = LLMNodeConfig(model_id="m", model_source="./.cache/models/smollm2")
    assert node.resolved_model_source() == str(tmp_path / ".cache/models/smollm2")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"unknown": 1}, "unknown"),
        ({"engine_kwargs": {"max_model_len": 10}}, "max_model_len -> max_model_len"),
        ({"engine_kwargs": {"model": "x"}}, "model -> model_source"),
        ({"engine_kwargs": {"distributed_executor_backend": "uni"}}, "distributed_executor_backend"),
        ({"accelerator_type": "L4"}, "accelerator_type is for device 'gpu' only"),
        ({"tensor_parallel_size": 2}, "needs device 'gpu'"),
        ({"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "4"}}, "kv_cache_space_gib"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"num_replicas": 0}, "num_replicas"),
    ],
)
def test_invalid_configs_are_refused_naming_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LLMNodeConfig.model_validate({"model_id": "m", "model_source": "/m", **fields})


def test_model_id_and_source_are_required() -> None:
    with pytest.raises(ValidationError, match="model_source"):
        LLMNodeConfig.model_validate({"model_id": "m"})
