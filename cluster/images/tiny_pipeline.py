"""A tiny Stable Diffusion pipeline built from configs: the diffusion node's local test subject.

Real diffusers and transformers classes (``StableDiffusionPipeline`` over a
``UNet2DConditionModel``, an ``AutoencoderKL`` with the usual 8x downscale, a
``CLIPTextModel`` and an ``EulerDiscreteScheduler``) at widths of 8 to 32 channels, with
weights drawn from a fixed seed. Its images are structured noise, but they are exactly
reproducible per seed and take tens of milliseconds at 64x64 on one CPU core.

The CLIP tokenizer is byte-level BPE without merges (every byte one token), so it needs
no hub files. ``prepare_tiny_pipeline`` saves the pipeline once under
``cache_dir/models/tiny-diffusion`` (built in a scratch directory, renamed into place under
a file lock, a marker written last) and returns that directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.core.files import file_lock
from cluster.images.errors import PipelineLoadError

if TYPE_CHECKING:
    # From its module: the package's lazy __init__ resolves to dummies for type checkers.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

MARKER = ".testbench-prepared.json"
FORMAT_VERSION = 1  # bump when the architecture or the seed changes
WEIGHTS_SEED = 20240601
TEXT_WIDTH = 32
MAX_PROMPT_TOKENS = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_pipeline_path(cache_dir: Path) -> Path:
    """Where the tiny pipeline lives (whether or not it is prepared yet)."""
    return Path(cache_dir) / "models" / "tiny-diffusion"


def is_prepared(path: Path) -> bool:
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == FORMAT_VERSION


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols, word-final or not."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = [bytes_to_unicode()[byte] for byte in range(256)]
    vocab = {BOS: 0, EOS: 1}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab[symbol] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_PROMPT_TOKENS)


def build_tiny_pipeline(seed: int = WEIGHTS_SEED) -> StableDiffusionPipeline:
    """The tiny pipeline in memory, its weights initialised from ``seed``."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_level_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            sample_size=64,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_WIDTH,
                intermediate_size=64,
                projection_dim=TEXT_WIDTH,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_PROMPT_TOKENS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )
    # diffusers annotates the optional safety checker and feature extractor as required.
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def prepare_tiny_pipeline(cache_dir: Path) -> Path:
    """Build and save the tiny pipeline once; return its directory. Safe to call concurrently."""
    target = tiny_pipeline_path(cache_dir)
    if is_prepared(target):
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if is_prepared(target):
            return target
        scratch = target.parent / f".{target.name}.build-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            build_tiny_pipeline().save_pretrained(scratch, safe_serialization=True)
            (scratch / MARKER).write_text(
                json.dumps({"format": FORMAT_VERSION, "weights_seed": WEIGHTS_SEED})
            )
            shutil.rmtree(target, ignore_errors=True)
            scratch.rename(target)
        except (OSError, ValueError, RuntimeError) as exc:
            raise PipelineLoadError(f"cannot build the tiny pipeline in {target}: {exc}") from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("diffusion.tiny_pipeline.prepared path=%s format=%d", target, FORMAT_VERSION)
    return target
