"""A registered streaming job: which node serves it, where its app answers, which key signs
its receipts. The loop audits every enabled one (``docs/architecture.md``, receipt audits)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

# job and request ids as receipts carry them (cluster/auth/receipts.py)
ID_PATTERN = r"^[A-Za-z0-9._:@/+=-]{1,200}$"
PUBLIC_KEY_HEX_PATTERN = r"^[0-9a-f]{64}$"


class StreamingJob(BaseModel):
    """A streaming job (``serve_apps/streaming``) registered with the validator.

    ``node_key`` is the key its receipts must be signed with, fixed at registration: a node
    that changes it later has its receipts refused (``wrong_key``)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(pattern=ID_PATTERN)
    node_id: str = Field(min_length=1, max_length=128)
    url: HttpUrl = Field(description="the job app's base URL (its /v1/completions, /job)")
    node_key: str = Field(pattern=PUBLIC_KEY_HEX_PATTERN, description="ed25519 public key, hex")
    model: str = Field(min_length=1, max_length=256, description="the model the job serves")
    enabled: bool = True
    registered_at: float = 0.0
    last_audited_at: float | None = None

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")
