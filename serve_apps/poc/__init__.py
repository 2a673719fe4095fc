"""The MLNode app: PoC (Ray worker actors, the pow routes), inference up/down, training
runs on Ray Train (``training.py``), and the node control API.

Import the Serve builder from ``serve_apps.poc.server``: it and ``training.py`` import Ray,
the rest is plain.
"""

from cluster.poc.protocol import NodeState, PowState
from serve_apps.poc.config import PocNodeConfig
from serve_apps.poc.deployers import LlmDeployer, LlmEndpoint, ServeLlmDeployer
from serve_apps.poc.serving import PocNodeService, StateConflict, Unavailable

__all__ = [
    "LlmDeployer", "LlmEndpoint", "NodeState", "PocNodeConfig", "PocNodeService",
    "PowState", "ServeLlmDeployer", "StateConflict", "Unavailable",
]
