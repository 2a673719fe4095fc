"""The Ray Serve LLM internals this package builds on (pinned: ``ray[serve]==2.60.0``).

``ray.serve.llm`` publishes ``LLMConfig``, ``build_llm_deployment``, ``OpenAiIngress`` and
``make_fastapi_ingress``, but not the three pieces needed to add routes beside the OpenAI
ones and to skip a no-op download step. They are imported here, in one place, so a Ray
upgrade that moves them breaks this module (``tests/serve_apps/llm/test_llm_signature.py`` imports
it through the public names), not the whole package. Ray's own ``OpenAiIngress`` docstring
imports ``to_model_metadata`` the same way.
"""

from __future__ import annotations

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS

__all__ = ["DEFAULT_ENDPOINTS", "CallbackBase", "to_model_metadata"]
