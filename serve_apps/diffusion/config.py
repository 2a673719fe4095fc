"""The diffusion app's configuration: the node config lives with the engine it configures
(``cluster/images/config.py``), so the validator's reference pipeline reads the same model."""

from cluster.images.config import DiffusionNodeConfig, ImageDefaults, ImageLimits, parse_size

__all__ = ["DiffusionNodeConfig", "ImageDefaults", "ImageLimits", "parse_size"]
