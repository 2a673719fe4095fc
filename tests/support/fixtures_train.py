"""Fixtures shared by the training tests (cluster/train, the MLNode app, the CLI, benches)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.core.settings import PROJECT_ROOT

GSM8K_TRAIN = PROJECT_ROOT / "datasets" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="session")
def tiny_lm_dir(smollm2_dir: Path) -> Path:
    """SmolLM2's architecture and tokenizer at a tiny size, drawn from seed 0 (cached)."""
    from cluster.testing.tiny_lm import build_tiny_lm

    return build_tiny_lm(smollm2_dir, PROJECT_ROOT / ".cache" / "models" / "tiny-smollm2")


def tiny_run(run_id: str, model: Path, output_dir: Path, **overrides: object) -> dict:
    """A training run of the tiny model on 200 gsm8k documents: 3 outer steps of 4 inner
    steps of 4 blocks of 64 tokens (a few seconds per node)."""
    run: dict = {
        "run_id": run_id,
        "model": str(model),
        "dataset": {"files": [str(GSM8K_TRAIN)], "text_fields": ["question", "answer"],
                    "max_docs": 200, "heldout_blocks": 4},
        "hyperparameters": {"seq_len": 64, "micro_batch_size": 4, "inner_steps": 4,
                            "outer_steps": 3, "inner_lr": 1e-3},
        "output_dir": str(output_dir),
    }
    run.update(overrides)
    return run
