"""``DeploymentOptions``: how Ray Serve places the replicas of one of testbench's apps.

One model for every app's builder (diffusion, evaluations, streaming jobs, PoC). An app
that wants other defaults subclasses it and overrides only the defaults, so a YAML
``deployment:`` section is validated the same way everywhere. No Ray import here: the
builders pass :meth:`DeploymentOptions.serve_options` to ``serve.deployment``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class DeploymentOptions(BaseModel):
    """Ray Serve placement of an app's replicas. The health and shutdown defaults are
    Serve's own (``ray.serve._private.constants``), spelled out so configs can lower them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_ongoing_requests: int = Field(default=64, ge=1)
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``serve.deployment(...)``."""
        actor: dict[str, float] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        return {
            "name": self.name,
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "ray_actor_options": actor,
        }
