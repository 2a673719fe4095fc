"""PSNR, PNG decoding and the reproducibility verdict on hand-made images."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image

from cluster.core.errors import ErrorCode
from cluster.images.checks import (
    ImageDecodeError,
    as_image_array,
    decode_png_b64,
    decode_png_bytes,
    psnr,
    reproducible,
)


def _png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_b64(array: np.ndarray) -> str:
    return base64.b64encode(_png_bytes(array)).decode("ascii")


@pytest.fixture
def noise() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)


def test_png_b64_round_trips_to_the_same_rgb_array(noise: np.ndarray) -> None:
    decoded = decode_png_b64(_png_b64(noise))
    assert decoded.dtype == np.uint8 and decoded.shape == (16, 24, 3)
    assert np.array_equal(decoded, noise)


def test_grey_and_rgba_pngs_decode_as_rgb(noise: np.ndarray) -> None:
    assert decode_png_bytes(_png_bytes(noise, "L")).shape == (16, 24, 3)
    rgba = decode_png_bytes(_png_bytes(noise, "RGBA"))
    assert np.array_equal(rgba, noise)


@pytest.mark.parametrize("bad", ["not base64 !!", base64.b64encode(b"not a png").decode()])
def test_undecodable_images_are_node_errors(bad: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_png_b64(bad)
    assert info.value.code is ErrorCode.NODE


def test_psnr_of_identical_images_is_infinite(noise: np.ndarray) -> None:
    assert psnr(noise, noise.copy()) == math.inf
    assert psnr(_png_b64(noise), _png_bytes(noise)) == math.inf


def test_psnr_matches_its_definition(noise: np.ndarray) -> None:
    shifted = noise.astype(np.int16)
    shifted[0, 0, 0] = (shifted[0, 0, 0] + 10) % 256
    shifted_u8 = shifted.astype(np.uint8)
    mse = float(np.mean((noise.astype(np.float64) - shifted_u8.astype(np.float64)) ** 2))
    assert psnr(noise, shifted_u8) == pytest.approx(10 * math.log10(255**2 / mse))


def test_psnr_of_black_against_white_is_zero() -> None:
    black = np.zeros((4, 4, 3), dtype=np.uint8)
    assert psnr(black, black + 255) == pytest.approx(0.0)


def test_psnr_refuses_different_shapes(noise: np.ndarray) -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(noise, noise[:8])


def test_as_image_array_refuses_float_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        as_image_array(np.zeros((4, 4, 3), dtype=np.float32))


def test_reproducible_accepts_small_noise_and_rejects_other_images(noise: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    jitter = rng.integers(-1, 2, size=noise.shape)
    nearly = np.clip(noise.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
    other = rng.integers(0, 256, size=noise.shape, dtype=np.uint8)
    assert reproducible(noise, noise)
    assert reproducible(noise, nearly)  # |error| <= 1 is about 50 dB
    assert not reproducible(noise, other)
    assert not reproducible(noise, nearly, threshold_db=math.inf)
    assert reproducible(noise, nearly, threshold_db=40.0)


def test_reproducible_is_false_for_different_sizes(noise: np.ndarray) -> None:
    assert not reproducible(noise, noise[:, :12])
