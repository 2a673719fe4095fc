"""Image comparison for diffusion nodes: decode base64 PNGs, PSNR, and a reproducibility verdict.

A validator regenerates a node's image with the same prompt, settings and seed on its
reference and calls :func:`reproducible`. Images are compared as 8-bit RGB arrays
(``uint8``, shape ``(height, width, 3)``); PSNR is in dB over the 0..255 range and ``inf``
for identical pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from cluster.core.errors import NodeError

ImageArray = NDArray[np.uint8]
ImageLike = ImageArray | str | bytes  # array, base64 PNG (str), or PNG bytes

DEFAULT_THRESHOLD_DB = 30.0
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class ImageDecodeError(NodeError):
    """A node's image is not valid base64, not a decodable image, or absurdly large."""


def decode_png_bytes(data: bytes) -> ImageArray:
    """PNG (or any PIL-readable image) bytes as an RGB ``uint8`` array."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(f"image of {width}x{height} pixels is too large")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"not a decodable image: {exc}") from exc


def decode_png_b64(data: str) -> ImageArray:
    """A base64 PNG (as in an images API's ``b64_json``) as an RGB ``uint8`` array."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"not valid base64: {exc}") from exc
    return decode_png_bytes(raw)


def as_image_array(image: ImageLike) -> ImageArray:
    """An array as is (checked), a ``str`` as base64 PNG, ``bytes`` as PNG bytes."""
    if isinstance(image, str):
        return decode_png_b64(image)
    if isinstance(image, bytes):
        return decode_png_bytes(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 HxW or HxWxC array, got {array.dtype} {array.shape}")
    return array


def psnr(a: ImageLike, b: ImageLike, max_value: float = 255.0) -> float:
    """Peak signal-to-noise ratio of two same-shaped images in dB (``inf`` if identical).

    Raises ``ValueError`` when the shapes differ.
    """
    left, right = as_image_array(a), as_image_array(b)
    if left.shape != right.shape:
        raise ValueError(f"image shapes differ: {left.shape} vs {right.shape}")
    mse = float(np.mean((left.astype(np.float64) - right.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(max_value**2 / mse)


def reproducible(a: ImageLike, b: ImageLike, threshold_db: float = DEFAULT_THRESHOLD_DB) -> bool:
    """Whether ``b`` reproduces ``a``: same shape and PSNR at least ``threshold_db``."""
    left, right = as_image_array(a), as_image_array(b)
    if left.shape != right.shape:
        return False
    return psnr(left, right) >= threshold_db
