"""``DiffusionNodeConfig``: what a diffusion node serves, its request limits and placement.

Serve config YAMLs pass the same fields as ``args`` to
:func:`serve_apps.diffusion.build_diffusion_app`; nested sections accept a dict or a model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.core.deployment import DeploymentOptions
from cluster.core.settings import PROJECT_ROOT

SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
TINY_MODEL_ID = "tiny-diffusion"


def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` as ``(width, height)``; raises ``ValueError`` on any other form."""
    if not re.fullmatch(SIZE_PATTERN, size):
        raise ValueError(f"size must look like 'WIDTHxHEIGHT' (e.g. '512x512'), got {size!r}")
    width, height = size.split("x")
    return int(width), int(height)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageLimits(_Strict):
    """What one request may ask of the node; anything beyond is answered with HTTP 400."""

    min_side: int = Field(default=32, ge=8, description="smallest width or height, pixels")
    max_width: int = Field(default=512, ge=8)
    max_height: int = Field(default=512, ge=8)
    size_multiple: int = Field(
        default=8, ge=1, description="width and height must be multiples (the VAE's factor)"
    )
    max_n: int = Field(default=4, ge=1, description="images per request")
    max_steps: int = Field(default=50, ge=1, description="num_inference_steps")
    max_prompt_chars: int = Field(default=2000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ImageLimits:
        if self.min_side > min(self.max_width, self.max_height):
            raise ValueError("min_side must not exceed max_width or max_height")
        return self


class ImageDefaults(_Strict):
    """What a request gets for the fields it leaves out."""

    size: str = Field(default="64x64", pattern=SIZE_PATTERN)
    steps: int = Field(default=4, ge=1)
    guidance_scale: float = Field(default=7.5, ge=0, le=50, allow_inf_nan=False)


class DiffusionDeployment(DeploymentOptions):
    """Ray Serve placement of the node's replicas."""

    name: str = "DiffusionServer"
    max_ongoing_requests: int = Field(
        default=8, ge=1, description="queued per replica; generation itself runs one at a time"
    )


class DiffusionNodeConfig(_Strict):
    """A diffusion node: its pipeline, where it runs, and its request policy.

    ``model_source=None`` serves the tiny pipeline built from configs and cached under
    ``cache_dir/models/tiny-diffusion`` (CPU tests and local runs); otherwise it names a
    diffusers pipeline directory (``model_index.json``) loaded with ``DiffusionPipeline``.
    """

    model_id: str = Field(default=TINY_MODEL_ID, min_length=1, description="served model name")
    model_source: str | None = Field(
        default=None, description="diffusers pipeline directory; None = the cached tiny pipeline"
    )
    cache_dir: Path = Field(default=PROJECT_ROOT / ".cache", description="for the tiny pipeline")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    torch_threads: int | None = Field(
        default=None, ge=1, description="intra-op threads; None = torch's default (OMP_NUM_THREADS)"
    )
    limits: ImageLimits = Field(default_factory=ImageLimits)
    defaults: ImageDefaults = Field(default_factory=ImageDefaults)
    deployment: DiffusionDeployment = Field(default_factory=DiffusionDeployment)

    @model_validator(mode="after")
    def _check(self) -> DiffusionNodeConfig:
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("dtype float16 needs device cuda (use float32 or bfloat16 on cpu)")
        if self.device == "cuda" and self.deployment.num_gpus <= 0:
            raise ValueError("device cuda needs deployment.num_gpus > 0")
        limits, defaults = self.limits, self.defaults
        width, height = parse_size(defaults.size)
        for side in (width, height):
            if side < limits.min_side or side % limits.size_multiple:
                raise ValueError(
                    f"defaults.size {defaults.size} breaks limits (min_side "
                    f"{limits.min_side}, multiple of {limits.size_multiple})"
                )
        if width > limits.max_width or height > limits.max_height:
            raise ValueError(f"defaults.size {defaults.size} exceeds the size limits")
        if defaults.steps > limits.max_steps:
            raise ValueError("defaults.steps exceeds limits.max_steps")
        return self
