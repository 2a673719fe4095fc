"""Settings: pydantic v2 models loaded from YAML, with ``TESTBENCH_*`` environment overrides.

Override rules (applied after the YAML file):
- ``TESTBENCH_POSTGRES_URL`` / ``TESTBENCH_MONGO_URL`` pick external servers (DESIGN §4).
- ``TESTBENCH_<SECTION>__<FIELD>`` sets any nested field, e.g.
  ``TESTBENCH_MANAGER__TARGET_SAMPLES=20``. Values are parsed as YAML scalars/lists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV_PREFIX = "TESTBENCH_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class StoreSettings(StrictModel):
    data_dir: Path = Field(default=PROJECT_ROOT / "data", description="embedded servers' data")
    postgres_url: str | None = Field(default=None, description="external PostgreSQL; None = embedded pgserver")
    mongo_url: str | None = Field(default=None, description="external MongoDB; None = embedded nx-27017")
    mongo_database: str = "testbench"


class RaySettings(StrictModel):
    address: str | None = Field(default=None, description="None = RAY_ADDRESS or a local cluster")
    namespace: str = "testbench"
    # Serve's ingress needs logical CPUs above the 2 physical ones on small machines.
    num_cpus: int = 4


class SlaSettings(StrictModel):
    """Timeout = TTFT(prompt tokens) + per-output-token time + queue allowance (seed 000)."""

    ttft_points: list[tuple[int, float]] = Field(
        default_factory=lambda: [(0, 0.0), (8192, 2.0), (32768, 10.0)]
    )
    per_output_token_s: float = 0.336
    queue_s: float = 30.0
    max_timeout_s: float = 120.0


class RequesterSettings(StrictModel):
    global_concurrency: int = Field(default=64, ge=1)
    per_node_concurrency: int = Field(default=8, ge=1)
    max_retries: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    response_size_cap_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    sla: SlaSettings = Field(default_factory=SlaSettings)


class ManagerSettings(StrictModel):
    tick_s: float = Field(default=5.0, gt=0)
    target_samples: int = Field(default=50, ge=1, description="buffer size per (node, task)")
    sample_ttl_s: float = Field(default=5 * 24 * 3600.0, gt=0)
    max_in_flight: int = Field(default=10, ge=1, description="docs in flight per (node, task)")
    failure_backoff_after: int = Field(default=3, ge=1, description="consecutive failed samples")
    backoff_base_s: float = Field(default=30.0, ge=0)
    backoff_max_s: float = Field(default=1800.0, ge=0)
    node_budget_per_hour: int = Field(default=100_000, ge=1, description="docs per node per hour")
    seed: int = 1234
    redrive_after_s: float = Field(
        default=120.0, ge=0, description="re-drive prompts pending longer than this"
    )
    task_dependencies: dict[str, list[str]] = Field(
        default_factory=dict, description="task -> tasks whose buffers must be full first"
    )
    node_refresh_s: float = Field(default=10.0, ge=0, description="re-read the node registry")


class PoolSettings(StrictModel):
    samplers: int = Field(default=2, ge=1)
    evaluators: int = Field(default=2, ge=1)


class Settings(StrictModel):
    stores: StoreSettings = Field(default_factory=StoreSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    manager: ManagerSettings = Field(default_factory=ManagerSettings)
    requester: RequesterSettings = Field(default_factory=RequesterSettings)
    pools: PoolSettings = Field(default_factory=PoolSettings)
    datasets_dir: Path = PROJECT_ROOT / "datasets"
    cache_dir: Path = PROJECT_ROOT / ".cache"
    tasks: list[str] = Field(default_factory=lambda: ["gsm8k", "openbookqa"])

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.tasks:
            raise ValueError("tasks: at least one task must be configured")
        return self


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot override {'.'.join(path)}: {key} is not a section")
    node[path[-1]] = value


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    out = dict(data)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key == "postgres_url":
            _set_path(out, ["stores", "postgres_url"], raw or None)
        elif key == "mongo_url":
            _set_path(out, ["stores", "mongo_url"], raw or None)
        elif key == "config":
            continue
        elif "__" in key:
            _set_path(out, key.split("__"), yaml.safe_load(raw) if raw else None)
    return out


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load settings from ``path`` (or ``$TESTBENCH_CONFIG``), then apply env overrides."""
    env = os.environ if environ is None else environ
    path = path or env.get("TESTBENCH_CONFIG")
    data: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: settings must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    return Settings.model_validate(apply_env_overrides(data, env))
