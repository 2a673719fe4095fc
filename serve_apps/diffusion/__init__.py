"""Diffusion node: a diffusers pipeline behind ``POST /v1/images/generations`` on Ray Serve.

``build_diffusion_app(config)`` returns the bound application; Serve config YAMLs name it as
``serve_apps.diffusion:build_diffusion_app`` with a :class:`DiffusionNodeConfig` as ``args``.
Locally the node serves a tiny pipeline built from configs (``prepare_tiny_pipeline``); in
production a diffusers model directory on a GPU.
"""

from cluster.images.config import (
    DiffusionDeployment,
    DiffusionNodeConfig,
    ImageDefaults,
    ImageLimits,
    parse_size,
)
from cluster.images.errors import ImageRequestError, PipelineLoadError
from cluster.images.tiny_pipeline import prepare_tiny_pipeline, tiny_pipeline_path
from serve_apps.diffusion.server import DiffusionServer, build_diffusion_app

__all__ = [
    "DiffusionDeployment",
    "DiffusionNodeConfig",
    "DiffusionServer",
    "ImageDefaults",
    "ImageLimits",
    "ImageRequestError",
    "PipelineLoadError",
    "build_diffusion_app",
    "parse_size",
    "prepare_tiny_pipeline",
    "tiny_pipeline_path",
]
