"""The zoo as ``make run`` uses it: every cheater next to the real honest node, registered
as ordinary nodes claiming the honest node's model.

    with demo_zoo(model_dir, honest_url=vllm_node_url) as zoo:
        for node in zoo_nodes(zoo.urls, model="smollm2"):
            await stores.nodes.add(node)          # after the honest node: it holds the identity
        verdicts = await run_verification(settings.honesty, nodes, references)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cluster.core.schemas import Node
from cluster.testing.zoo.process import ZooProcess

CHEATERS: tuple[str, ...] = ("perturbed", "quantized", "lazy", "random")
NODE_PREFIX = "zoo-"


def demo_zoo(model_dir: str | Path, *, honest_url: str | None = None,
             log_path: str | Path | None = None) -> ZooProcess:
    """A zoo of every cheater; the proxy fronts ``honest_url`` (e.g. the real vLLM node),
    or, without one, a zoo ``honest`` node started alongside."""
    nodes = [*CHEATERS, f"proxy@{honest_url}" if honest_url else "proxy@honest"]
    if honest_url is None:
        nodes.insert(0, "honest")
    return ZooProcess(nodes, model_dir, log_path=log_path)


def zoo_nodes(urls: Mapping[str, str], model: str = "smollm2",
              tasks: list[str] | None = None) -> list[Node]:
    """Registry records of the zoo's nodes (ids ``zoo-<kind>``), honest one first.
    ``tasks``: what the measuring loop runs on them (None = every configured task)."""
    order = sorted(urls, key=lambda name: (name != "honest", name))
    return [Node(node_id=f"{NODE_PREFIX}{name}", url=urls[name], model=model,
                 api="completions", tasks=tasks) for name in order]
