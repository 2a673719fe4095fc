"""A scriptable OpenAI-compatible test node: a real HTTP server for tests and benches.

``TestNode(NodeBehaviour(mode="wrong", hang_rate=0.1), tokenizer_path=...)`` answers
``/v1/completions`` (incl. lm-eval's echo + logprobs loglikelihood requests) and
``/v1/chat/completions`` deterministically, and injects faults at the given rates.
Run it as a process with ``python -m cluster.testing.testnode --port P --mode correct``.
"""

from cluster.testing.testnode.behaviour import Fault, NodeBehaviour
from cluster.testing.testnode.server import NodeStats, TestNode

__all__ = ["Fault", "NodeBehaviour", "NodeStats", "TestNode"]
