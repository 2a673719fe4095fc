"""The PoC node: Ray worker actors, the pow routes and the node control API.

Import the Serve builder from ``serve_apps.poc.server`` (it imports Ray); the rest is plain.
"""

from cluster.poc.protocol import NodeState, PowState
from serve_apps.poc.config import PocNodeConfig
from serve_apps.poc.deployers import LlmDeployer, LlmEndpoint, ServeLlmDeployer
from serve_apps.poc.serving import NotSupported, PocNodeService, StateConflict

__all__ = [
    "LlmDeployer", "LlmEndpoint", "NodeState", "NotSupported", "PocNodeConfig", "PocNodeService",
    "PowState", "ServeLlmDeployer", "StateConflict",
]
