"""Diffusion tasks: a node's image, regenerated on the validator's reference, compared by PSNR.

A diffusion task lives in ``datasets/<task>/<task>.yaml`` with ``kind: diffusion`` (lm-eval
skips it: it has no ``task:`` key) and rows ``{"prompt", "seed"}``. It exposes the same
surface as :class:`cluster.tasks.lmeval.TaskAdapter` (``build_prompts``, ``score``,
``aggregate``, ``metric_names``, ``eval_split``), so the Sampler, Evaluator and buffers
treat it like any other task; :func:`cluster.tasks.registry.load_adapter` picks the kind.

The reference is a diffusers pipeline loaded in the validator's process (the Evaluator),
once per (task, claimed model): on CPU the tiny pipeline built from configs, in production
a model directory. A node that claims a model the task has no reference for cannot be
checked: its samples fail with an evaluation error that says so.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.core.errors import EvaluationError, NodeError, TaskError
from cluster.core.schemas import Node, Prompt, Relay, prompt_id
from cluster.tasks.native import mean_stderr, native_task_config

IMAGES_PATH: Literal["/v1/images/generations"] = "/v1/images/generations"
# PSNR of identical images is infinite; cap it so means and stderrs stay finite.
PSNR_CAP_DB = 100.0


class ReferencePipeline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_source: str | None = Field(
        default=None, description="diffusers pipeline dir; None = the cached tiny pipeline"
    )
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class DiffusionTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    testbench_task: str
    kind: Literal["diffusion"]
    test_split: str = "test"
    size: str = Field(default="64x64", pattern=r"^\d+x\d+$")
    steps: int = Field(default=4, ge=1, le=200)
    guidance_scale: float = Field(default=7.5, ge=0)
    psnr_threshold_db: float = Field(default=30.0, gt=0)
    references: dict[str, ReferencePipeline] = Field(default_factory=dict)


def diffusion_task_config(name: str, datasets_dir: Path) -> DiffusionTaskConfig | None:
    """The task's config when ``datasets/<name>/<name>.yaml`` is a diffusion task, else None."""
    return native_task_config(name, datasets_dir, "diffusion", DiffusionTaskConfig)


class _ReferenceEngines:
    """One loaded reference pipeline per (model source, device, dtype), generation serialised
    (a diffusers pipeline is not thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[tuple[str | None, str, str], Any] = {}

    def generate(self, ref: ReferencePipeline, job: Any) -> Any:
        from cluster.images.config import DiffusionNodeConfig
        from cluster.images.engine import DiffusersEngine

        key = (ref.model_source, ref.device, ref.dtype)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                config = DiffusionNodeConfig(
                    model_source=ref.model_source, device=ref.device, dtype=ref.dtype,
                    deployment={"num_gpus": 1} if ref.device == "cuda" else {},
                )
                engine = self._engines[key] = DiffusersEngine.load(config)
            return engine.generate(job)[0]


_references = _ReferenceEngines()


class DiffusionTaskAdapter:
    """A diffusion task for one node (the model it claims picks the reference)."""

    output_type = "diffusion"
    repeats = 1

    def __init__(self, config: DiffusionTaskConfig, model: str) -> None:
        self.config = config
        self.model = model
        self.name = config.testbench_task
        self.eval_split = config.test_split
        self.metric_names = ["reproducible", "psnr_db"]
        self.path = IMAGES_PATH

    def request_body(self, doc: dict[str, Any]) -> dict[str, Any]:
        prompt, seed = doc.get("prompt"), doc.get("seed")
        if not isinstance(prompt, str) or not prompt or not isinstance(seed, int):
            raise TaskError(f"task {self.name}: a doc needs a non-empty 'prompt' and an int 'seed'")
        return {
            "model": self.model, "prompt": prompt, "n": 1, "size": self.config.size,
            "seed": seed, "steps": self.config.steps,
            "guidance_scale": self.config.guidance_scale, "response_format": "b64_json",
        }

    def build_prompts(
        self, node: Node, doc_id: int, doc: dict[str, Any], sample_key: str, now: float
    ) -> list[Prompt]:
        body = self.request_body(doc)
        return [Prompt(
            prompt_id=prompt_id(sample_key, 0), sample_key=sample_key, node_id=node.node_id,
            task=self.name, doc_id=doc_id, request_index=0, n_requests=1, path=self.path,
            body=copy.deepcopy(body), prompt_tokens=0, max_output_tokens=0, created_at=now,
        )]

    def node_image(self, response: dict[str, Any], where: str) -> Any:
        from cluster.images.checks import decode_png_b64

        data = response.get("data") if isinstance(response, dict) else None
        if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
            raise NodeError(f"{where}: expected data with one image, got {str(data)[:200]}")
        b64 = data[0].get("b64_json")
        if not isinstance(b64, str):
            raise NodeError(f"{where}: the image has no b64_json string")
        return decode_png_b64(b64)

    def reference_image(self, doc: dict[str, Any]) -> Any:
        import numpy as np

        from cluster.images.config import parse_size
        from cluster.images.engine import GenerationJob

        ref = self.config.references.get(self.model)
        if ref is None:
            known = ", ".join(sorted(self.config.references)) or "none"
            raise EvaluationError(
                f"task {self.name} has no reference pipeline for claimed model {self.model!r} "
                f"(references: {known})"
            )
        width, height = parse_size(self.config.size)
        job = GenerationJob(
            prompt=doc["prompt"], negative_prompt=None, width=width, height=height,
            steps=self.config.steps, guidance_scale=self.config.guidance_scale,
            seeds=(int(doc["seed"]),),
        )
        return np.asarray(_references.generate(ref, job).convert("RGB"), dtype=np.uint8)

    def score(self, doc_id: int, doc: dict[str, Any], relays: list[Relay]) -> dict[str, float]:
        """``reproducible`` (PSNR ≥ threshold) and ``psnr_db`` against the reference.

        Raises :class:`NodeError` for a missing or undecodable image (the node's fault) and
        :class:`EvaluationError` when the validator cannot regenerate."""
        from cluster.images.checks import psnr

        if len(relays) != 1:
            raise TaskError(f"task {self.name} doc {doc_id}: expected 1 relay, got {len(relays)}")
        where = f"{self.name} doc {doc_id}"
        image = self.node_image(relays[0].response or {}, where)
        reference = self.reference_image(doc)
        if image.shape != reference.shape:
            return {"reproducible": 0.0, "psnr_db": 0.0}
        value = min(psnr(image, reference), PSNR_CAP_DB)
        return {
            "reproducible": float(value >= self.config.psnr_threshold_db),
            "psnr_db": float(value),
        }

    def aggregate(self, metric: str, values: list[float]) -> tuple[float, float | None]:
        return mean_stderr(metric, values)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {m: True for m in self.metric_names}
