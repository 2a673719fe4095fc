"""``StreamingJobConfig``: the job a wrapper serves, where its model runs, and the node's key.

Serve config YAMLs pass the same fields as ``args`` to
:func:`serve_apps.streaming.server.build_streaming_app`; nested sections accept a dict or a model.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from cluster.auth.keys import Ed25519Key
from cluster.auth.receipts import ID_PATTERN
from cluster.core.deployment import DeploymentOptions
from cluster.core.settings import AuthSettings


class StreamingDeployment(DeploymentOptions):
    # Peer-auth nonces are kept per replica unless auth.nonce_mongo_url is set.
    name: str = "StreamingJob"
    num_cpus: float = Field(default=0.0, ge=0, description="the wrapper only forwards bytes")


class StreamingJobConfig(BaseModel):
    """A streaming organic job: one whitelisted model app, queried many times;
    every answer carries a receipt signed with the node's key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=ID_PATTERN)
    upstream_url: str = Field(
        min_length=1, description="the node's OpenAI-compatible model app (routes under /v1)"
    )
    models: list[str] = Field(
        default_factory=list,
        description="model names this job serves; a request for another is refused (404). "
        "Empty = whatever the upstream serves",
    )
    signing_key_hex: SecretStr | None = Field(default=None, description="the node key's seed, hex")
    signing_key_file: Path | None = Field(default=None, description="a file holding the seed")
    request_timeout_s: float = Field(default=600.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    auth: AuthSettings = Field(default_factory=AuthSettings, description="who may call the job")
    deployment: StreamingDeployment = Field(default_factory=StreamingDeployment)

    @model_validator(mode="after")
    def _one_key(self) -> StreamingJobConfig:
        if (self.signing_key_hex is None) == (self.signing_key_file is None):
            raise ValueError("give exactly one of signing_key_hex and signing_key_file")
        return self

    @property
    def upstream(self) -> str:
        return self.upstream_url.rstrip("/")

    def signing_key(self) -> Ed25519Key:
        if self.signing_key_hex is not None:
            return Ed25519Key.from_hex(self.signing_key_hex.get_secret_value())
        assert self.signing_key_file is not None
        return Ed25519Key.from_file(self.signing_key_file)
