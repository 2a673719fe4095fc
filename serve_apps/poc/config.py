"""Settings of the PoC node app (YAML ``args`` of the Serve app, or a dict in tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from cluster.auth.keys import Ed25519Key
from cluster.core.deployment import DeploymentOptions
from cluster.core.settings import AuthSettings, EndpointAllowlist
from cluster.poc.config import ValidationConfig
from cluster.train.config import ScalingSpec


class PocDeployment(DeploymentOptions):
    """The node's ingress. One replica: the service state (PoC, inference) lives in it."""

    name: str = "PocNode"
    num_replicas: int = Field(default=1, ge=1, le=1)
    num_cpus: float = Field(default=0.0, ge=0)
    max_ongoing_requests: int = Field(default=256, ge=1)


class TrainingNodeConfig(BaseModel):
    """The node's side of training runs: its key, its hardware, where data comes from.

    ``node_key_file`` / ``node_key_hex`` is the ed25519 key this node signs its outer-sync
    messages with (its public key is what the Network Node registers with the other nodes
    of a run); without one the node refuses to train.
    """

    model_config = ConfigDict(extra="forbid")

    node_key_file: Path | None = Field(default=None, description="a file holding the seed, hex")
    node_key_hex: SecretStr | None = Field(default=None, description="the seed, hex")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    postgres_url: str | None = Field(
        default=None, description="for dataset.task runs; None = $TESTBENCH_POSTGRES_URL")
    output_root: Path | None = Field(
        default=None, description="if set, a run's output_dir must lie inside it")
    max_message_bytes: int = Field(default=2 * 1024**3, ge=1024,
                                   description="largest outer-sync message accepted")
    stop_timeout_s: float = Field(default=120.0, gt=0,
                                  description="POST /train/stop waits this long for the workers")
    peer_allowlist: EndpointAllowlist = Field(
        default_factory=EndpointAllowlist,
        description="peers' endpoints the endpoint policy refuses by default (loopback, "
        "private, ...) that outer-sync messages may be sent to anyway, e.g. the MLNodes' "
        "private network (cluster/nodes/policy.py)")

    @model_validator(mode="after")
    def _one_key(self) -> TrainingNodeConfig:
        if self.node_key_file is not None and self.node_key_hex is not None:
            raise ValueError("give at most one of node_key_file and node_key_hex")
        return self

    def node_key(self) -> Ed25519Key | None:
        if self.node_key_hex is not None:
            return Ed25519Key.from_hex(self.node_key_hex.get_secret_value())
        if self.node_key_file is not None:
            return Ed25519Key.from_file(self.node_key_file)
        return None


class PocNodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=2, ge=1, description="Ray worker actors generating nonces")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    threads_per_worker: int | None = Field(
        default=None, ge=1, description="torch threads per worker; None = max(1, cpus_per_worker)"
    )
    device: str = Field(default="cpu", description="'cuda' with gpus_per_worker > 0")
    batches_per_chunk: int = Field(default=16, ge=1, description="forward batches per worker call")
    chunks_in_flight: int = Field(default=2, ge=1, description="queued calls per worker")
    drain_timeout_s: float = Field(
        default=30.0, gt=0, description="on stop, wait this long for chunks in flight")
    max_stored_batches: int = Field(default=100_000, ge=1)
    callback_timeout_s: float = Field(default=10.0, gt=0)
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig,
        description="thresholds for /pow/validate (fraud_threshold in init overrides p)",
    )
    deployer: str = Field(
        default="serve_apps.poc.deployers:ServeLlmDeployer",
        description="import path of the LlmDeployer class for /api/v1/inference/up",
    )
    deployer_args: dict[str, Any] = Field(
        default_factory=lambda: {"app_name": "llm-node", "route_prefix": "/llm"},
        description="keyword arguments the deployer class is built with",
    )
    training: TrainingNodeConfig = Field(default_factory=TrainingNodeConfig)
    deployment: PocDeployment = Field(default_factory=PocDeployment)
    auth: AuthSettings = Field(
        default_factory=AuthSettings,
        description="peer authentication of the control routes: on when keys are configured "
        "(purpose 'control'), off without keys or with enabled: false (local dev)",
    )

    @model_validator(mode="after")
    def _device_matches_gpus(self) -> PocNodeConfig:
        if self.device.startswith("cuda") and self.gpus_per_worker <= 0:
            raise ValueError("device 'cuda' needs gpus_per_worker > 0")
        return self

    @property
    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))
