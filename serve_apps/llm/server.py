"""``build_llm_node_app``: the LLM node as one Serve application.

Deployments (the same graph ``ray.serve.llm.build_openai_app`` builds, plus one):

- ``LLMServer:<model_id>``: Ray Serve LLM's vLLM server (``build_llm_deployment``);
- ``ModelSignatures``: the signature files of the same model (0 CPUs);
- ``NodeIngress``: the HTTP ingress, OpenAI routes and ``/signature/...`` routes.

A Serve config file points its ``import_path`` at this builder and gives an
``LLMNodeConfig`` as ``args``::

    applications:
      - name: llm
        route_prefix: /
        import_path: serve_apps.llm:build_llm_node_app
        args: {model_id: smollm2, model_source: ./.cache/models/smollm2, device: cpu}
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import make_fastapi_ingress

from cluster.modeldir.signatures import ModelSignatures
from serve_apps.llm.callbacks import LocalModelCallback
from serve_apps.llm.config import LLMNodeConfig
from serve_apps.llm.ray_llm_compat import to_model_metadata
from serve_apps.llm.routes import NODE_ENDPOINTS, NodeIngress


def build_llm_config(config: LLMNodeConfig) -> LLMConfig:
    """The Ray Serve LLM config of a node (local model directories skip the download task)."""
    return config.to_llm_config(callback_config={"callback_class": LocalModelCallback})


def build_llm_node_app(config: dict[str, Any] | LLMNodeConfig) -> Application:
    """The LLM node application: OpenAI-compatible routes and signature routes at one root."""
    node = config if isinstance(config, LLMNodeConfig) else LLMNodeConfig.model_validate(config)
    llm_config = build_llm_config(node)
    server = build_llm_deployment(llm_config)
    signatures = serve.deployment(
        ModelSignatures,
        name="ModelSignatures",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": dict(node.env_vars)}},
    ).bind(node.model_id, node.resolved_model_source())
    ingress_cls = make_fastapi_ingress(NodeIngress, endpoint_map=NODE_ENDPOINTS)
    ingress_options = NodeIngress.get_deployment_options([llm_config])
    return serve.deployment(ingress_cls, name="NodeIngress", **ingress_options).bind(
        llm_deployments={node.model_id: server},
        model_cards={node.model_id: to_model_metadata(node.model_id, llm_config)},
        signatures=signatures,
    )
