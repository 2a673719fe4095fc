"""The LLM node: Ray Serve LLM (vLLM) behind OpenAI routes, plus signature endpoints.

Public API (what users and Serve config files import)::

    from serve_apps.llm import LLMNodeConfig, build_llm_node_app

    app = build_llm_node_app({"model_id": "smollm2", "model_source": "./.cache/models/smollm2"})

Config files: ``import_path: serve_apps.llm:build_llm_node_app`` with the config as ``args``
(see ``serve_apps/configs/``).

The names are imported on first use: the ``ModelSignatures`` replica imports
``cluster.modeldir.signatures`` (pydantic and hashlib only) and must not pay for Ray Serve
LLM's imports (~30 s of CPU on a busy 2-core machine) while vLLM starts beside it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.modeldir.signatures import ModelSignatures, SignatureError, UnknownSignatureFile
    from cluster.wire.signatures import ConfigSignature, FileDigest, TokenizerSignature
    from serve_apps.llm.config import LLMNodeConfig
    from serve_apps.llm.server import build_llm_config, build_llm_node_app

_EXPORTS: dict[str, str] = {
    "build_llm_config": "serve_apps.llm.server",
    "build_llm_node_app": "serve_apps.llm.server",
    "LLMNodeConfig": "serve_apps.llm.config",
    "ConfigSignature": "cluster.wire.signatures",
    "FileDigest": "cluster.wire.signatures",
    "TokenizerSignature": "cluster.wire.signatures",
    "ModelSignatures": "cluster.modeldir.signatures",
    "SignatureError": "cluster.modeldir.signatures",
    "UnknownSignatureFile": "cluster.modeldir.signatures",
}

__all__ = [
    "ConfigSignature",
    "FileDigest",
    "LLMNodeConfig",
    "ModelSignatures",
    "SignatureError",
    "TokenizerSignature",
    "UnknownSignatureFile",
    "build_llm_config",
    "build_llm_node_app",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
