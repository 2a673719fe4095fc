"""The Sampler as a plain class on the session's stores: batches asked for together."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from actors.sampler import Sampler
from cluster.core.schemas import Node, SampleRequest
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections


class CountingClock:
    """The Sampler reads the clock once per batch, when it starts building its prompts."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return time.time()


async def test_batches_asked_for_together_each_leave_once_built(
    fresh_settings: Settings, smollm2_dir: Path
) -> None:
    """The Manager sends a tick's batches at once. Building prompts is CPU work between two
    store round trips; batches let in together each built while the others waited on their
    stores, so the first batch reached the Requester only once the last had been built
    (``bench/sim_nodes.py``: no relay for 3 s after the first prompts). Each batch now
    leaves as soon as its own prompts are stored, in the order the batches came."""
    settings = fresh_settings.model_copy(update={"tasks": ["gsm8k"]})
    clock = CountingClock()
    stores = StoreConnections(settings)
    sampler = Sampler(settings, stores, clock=clock)
    nodes = [Node(node_id=f"n{i}", url=f"http://127.0.0.1:9/n{i}", model="smollm2",
                  tokenizer=str(smollm2_dir)) for i in range(3)]
    builds_when_done: list[tuple[str, int]] = []

    async def batch(node: Node) -> int:
        req = SampleRequest(node=node, task="gsm8k", count=4, exclude_doc_ids=[], epoch=0,
                            seed=7)
        draws, prompts, _ = await sampler.sample_batch([req])
        builds_when_done.append((node.node_id, clock.calls))
        assert draws[0].error is None
        return len(prompts)

    try:
        sizes = await asyncio.gather(*(batch(n) for n in nodes))
    finally:
        await stores.close()
    assert sizes == [4, 4, 4]
    # the n-th batch done when n batches had been built: none waited for a later one
    assert builds_when_done == [("n0", 1), ("n1", 2), ("n2", 3)]
