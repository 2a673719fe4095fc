"""Wire format of the diffusion node (OpenAI-images-like): the only module spelling JSON names.

``POST /v1/images/generations`` takes an :class:`ImageGenerationRequest` and answers an
:class:`ImageGenerationResponse` whose images are base64 PNGs. Beyond OpenAI's fields a
request may carry ``seed``, ``steps`` (``num_inference_steps``), ``guidance_scale`` and
``negative_prompt``; the response echoes the settings used and each image's seed.
Malformed requests get HTTP 422, requests outside the node's limits HTTP 400, both with an
OpenAI error body (:class:`ErrorResponse`).
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.images.config import SIZE_PATTERN

if TYPE_CHECKING:
    from PIL import Image

MAX_SEED = 2**63 - 1


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageGenerationRequest(_Wire):
    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    model: str | None = Field(default=None, description="must name the served model if given")
    n: int = Field(default=1, ge=1, strict=True, description="images, seeds seed..seed+n-1")
    size: str | None = Field(default=None, pattern=SIZE_PATTERN, description="'WIDTHxHEIGHT'")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, strict=True, description="None = drawn by the node"
    )
    steps: int | None = Field(default=None, ge=1, strict=True, description="num_inference_steps")
    guidance_scale: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    response_format: Literal["b64_json"] = "b64_json"
    user: str | None = Field(default=None, description="accepted for OpenAI clients; unused")


class ImageObject(_Wire):
    b64_json: str = Field(description="PNG, base64")
    seed: int = Field(description="regenerates exactly this image with n=1")


class ImageGenerationResponse(_Wire):
    created: int
    model: str
    size: str
    steps: int
    guidance_scale: float
    data: list[ImageObject]


class ModelCard(_Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "testbench"


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(_Wire):
    status: Literal["ok"] = "ok"
    model: str


class ErrorDetail(_Wire):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Wire):
    error: ErrorDetail


def encode_png_b64(image: Image.Image) -> str:
    """The image as a base64 PNG (lossless, no metadata: equal pixels give equal strings)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
