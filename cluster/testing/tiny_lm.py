"""A tiny causal LM of SmolLM2's architecture (Llama, tied embeddings) and tokenizer, drawn
from a seed: the fast stand-in for SmolLM2 in training tests and benches.

Head size 64 (2 heads of 64 in a 128-wide model) so vLLM's CPU attention takes it like any
model; SmolLM2's tokenizer and chat template, so the Serve LLM app loads it unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from cluster.core.files import file_lock

TINY_DIMS = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}
MARKER = ".tiny-lm-ready"


def build_tiny_lm(source: Path, out: Path, seed: int = 0) -> Path:
    """A tiny model directory at ``out`` (built once; the same bits for the same seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cluster.train.export import tokenizer_files

    if (out / MARKER).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out.with_name(out.name + ".lock")):
        if (out / MARKER).is_file():
            return out
        config = AutoConfig.from_pretrained(source)
        for name, value in TINY_DIMS.items():
            setattr(config, name, value)
        config.max_position_embeddings = 2048
        config.dtype = "float32"
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for f in tokenizer_files(source):
            shutil.copy2(f, out / f.name)
        model.save_pretrained(str(out), safe_serialization=True)
        (out / MARKER).write_text(str(seed))
    return out
