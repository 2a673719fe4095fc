"""The LLM node the serve tests run against: its config and what the fixture hands out.

(A module of its own, with a name unique across test directories, so test modules can
import ``LLMNode`` for their annotations without importing a ``conftest``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serve_apps.llm import LLMNodeConfig

APP_NAME = "llm-node-test"
MODEL_ID = "smollm2"


@dataclass(frozen=True)
class LLMNode:
    """A running LLM node: its base URL (OpenAI routes under ``{url}/v1``) and model."""

    url: str
    model_id: str
    model_dir: Path
    start_s: float

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"


def node_config(model_dir: Path) -> LLMNodeConfig:
    return LLMNodeConfig(
        model_id=MODEL_ID,
        model_source=str(model_dir),
        device="cpu",
        dtype="float32",
        max_model_len=2048,
        kv_cache_space_gib=1,
        seeded_sampling=True,  # replayable sampling: tests/serve_apps/llm/test_llm_seeded.py
        env_vars={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
