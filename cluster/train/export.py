"""The trained model as a Hugging Face model directory any LLM node loads unchanged.

``model_dir`` = ``save_pretrained`` (config + safetensors weights) + the source directory's
tokenizer files and chat template, so the Serve LLM app (``serve_apps/llm``) can point
``model_source`` at it like at any converted model. Written beside, then renamed into
place: a reader never sees half a directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
TRAINING_RECORD = "training.json"


def tokenizer_files(source: Path) -> list[Path]:
    """The files of ``source`` that are not weights or the model config."""
    return sorted(p for p in source.iterdir()
                  if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
                  and p.name not in NOT_COPIED and not p.name.startswith("."))


def export_model_dir(model: Any, source: Path, out: Path, record: dict[str, Any]) -> Path:
    """Write ``model`` (a transformers ``PreTrainedModel``) to ``out``."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in tokenizer_files(source):
        shutil.copy2(f, tmp / f.name)
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
