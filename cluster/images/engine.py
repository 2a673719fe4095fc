"""The image engine: a diffusers pipeline that turns a :class:`GenerationJob` into images.

Each image is generated on its own with a CPU ``torch.Generator`` seeded with its seed, so
an image depends only on (prompt, settings, seed), not on ``n`` or its place in a batch:
image ``i`` of a request with seed ``s`` equals the single image of seed ``s + i``. The
CPU generator also keeps the initial noise identical across CPU and CUDA devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cluster.images.config import DiffusionNodeConfig
from cluster.images.errors import PipelineLoadError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationJob:
    """One request's work, already validated against the node's limits."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]


class ImageEngine(Protocol):
    """What :class:`~serve_apps.diffusion.serving.ImageServing` needs from an engine."""

    def generate(self, job: GenerationJob) -> list[Image.Image]: ...


class DiffusersEngine:
    """A loaded diffusers text-to-image pipeline on its device. Not thread-safe.

    ``pipeline`` is any diffusers text-to-image pipeline object (called with ``prompt``,
    ``width``, ``height``, ``num_inference_steps``, ``guidance_scale``, ``generator``).
    """

    def __init__(self, pipeline: Callable[..., Any]) -> None:
        self._pipeline = pipeline

    @classmethod
    def load(cls, config: DiffusionNodeConfig) -> DiffusersEngine:
        """Load ``config.model_source`` (or the cached tiny pipeline) onto ``config.device``."""
        import torch
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        from cluster.images.tiny_pipeline import prepare_tiny_pipeline

        diffusers_logging.disable_progress_bar()
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        if config.device == "cuda" and not torch.cuda.is_available():
            raise PipelineLoadError("device cuda requested but torch sees no CUDA device")
        source: str | Path = config.model_source or prepare_tiny_pipeline(config.cache_dir)
        try:
            pipeline = DiffusionPipeline.from_pretrained(
                str(source), dtype=getattr(torch, config.dtype)
            )
            pipeline = pipeline.to(config.device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise PipelineLoadError(f"cannot load diffusers pipeline from {source}: {exc}") from exc
        pipeline.set_progress_bar_config(disable=True)
        log.info(
            "diffusion.engine.loaded source=%s pipeline=%s device=%s dtype=%s threads=%d",
            source, type(pipeline).__name__, config.device, config.dtype, torch.get_num_threads(),
        )
        return cls(pipeline)

    def generate(self, job: GenerationJob) -> list[Image.Image]:
        import torch

        images: list[Image.Image] = []
        for seed in job.seeds:
            kwargs: dict[str, Any] = {
                "prompt": job.prompt,
                "width": job.width,
                "height": job.height,
                "num_inference_steps": job.steps,
                "guidance_scale": job.guidance_scale,
                "generator": torch.Generator("cpu").manual_seed(seed),
                "output_type": "pil",
            }
            if job.negative_prompt is not None:
                kwargs["negative_prompt"] = job.negative_prompt
            with torch.inference_mode():
                output = self._pipeline(**kwargs)
            images.append(output.images[0])
        return images
