"""The loop's relay sink: relays are recorded batch by batch; their measuring counts are
summed and written every ``honesty.traffic_flush_s``, all nodes in one write."""

from __future__ import annotations

import asyncio
import time

from actors.local import MongoRelaySink
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Prompt, Relay
from cluster.core.settings import Settings
from cluster.honesty.traffic import read_ledger, traffic_report
from cluster.storage.connections import StoreConnections


def _prompt(node: str, doc: int) -> Prompt:
    key = f"{node}|gsm8k|{doc}|0"
    return Prompt(prompt_id=f"{key}|0", sample_key=key, node_id=node, task="gsm8k",
                  doc_id=doc, request_index=0, n_requests=1, path="/v1/completions",
                  body={"prompt": "x", "max_tokens": 4}, prompt_tokens=10,
                  max_output_tokens=4, created_at=time.time())


def _relay(prompt: Prompt) -> Relay:
    now = time.time()
    return Relay(prompt_id=prompt.prompt_id, sample_key=prompt.sample_key,
                 node_id=prompt.node_id, task=prompt.task, doc_id=prompt.doc_id,
                 request_index=0, error_code=ErrorCode.OK,
                 response={"usage": {"completion_tokens": 3}}, started_at=now,
                 finished_at=now)


async def test_counts_are_summed_and_written_once_per_flush_interval(
        fresh_settings: Settings) -> None:
    stores = StoreConnections(fresh_settings)
    try:
        mongo = await stores.mongo()
        await mongo.ensure_indexes()
        sink = MongoRelaySink(stores, flush_s=0.5)
        prompts = [_prompt(n, d) for n in ("a", "b") for d in range(3)]
        await mongo.prompts.insert_many(prompts)
        by_id = {p.prompt_id: p for p in prompts}
        await sink.record_relays([_relay(p) for p in prompts[:4]], by_id)
        await sink.record_relays([_relay(p) for p in prompts[4:]], by_id)
        await sink.record_relays([_relay(prompts[0])], by_id)  # a replay: counted once
        assert await mongo.relays.usages([p.prompt_id for p in prompts])  # recorded at once
        assert await read_ledger(mongo, 0.0) == {}  # counts wait for the flush
        await asyncio.sleep(1.0)
        counters = await read_ledger(mongo, 0.0)
        exact = {r.node_id: r for r in await traffic_report(mongo, ["a", "b"], 0.0)}
        for node in ("a", "b"):
            assert counters[node].measuring == exact[node].measuring
            assert counters[node].measuring.requests == 3
            assert counters[node].measuring_ok == 3
        await sink.flush()  # nothing pending: nothing changes
        assert (await read_ledger(mongo, 0.0))["a"].measuring.requests == 3
    finally:
        await stores.close()
