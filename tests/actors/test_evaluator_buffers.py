"""The Evaluator's buffer refresh: merged from the samples it just recorded when it wrote the
buffer last, recomputed from the samples collection when anyone else did (real MongoDB)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from actors.evaluator import Evaluator
from cluster.core.buffers import summarize_buffer
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Sample
from cluster.core.settings import Settings
from cluster.storage.connections import StoreConnections

PAIR = ("n1", "openbookqa")


@dataclass
class Adapter:
    """What a refresh needs of a task adapter: its metric names (default aggregation)."""

    metric_names: tuple[str, ...] = ("acc,none",)
    aggregate: None = None


def sample(doc_id: int, created_at: float, acc: float = 1.0,
           code: ErrorCode = ErrorCode.OK) -> Sample:
    return Sample(sample_key=f"n1|openbookqa|{doc_id}|0", node_id="n1", task="openbookqa",
                  doc_id=doc_id, epoch=0, error_code=code,
                  metrics={"acc,none": acc} if code == ErrorCode.OK else {},
                  latency_s=0.5, created_at=created_at)


def with_target(settings: Settings, target: int) -> Settings:
    return settings.model_copy(update={"manager": settings.manager.model_copy(
        update={"task_targets": {"openbookqa": target}})})


async def record_and_refresh(evaluator: Evaluator, stores: StoreConnections,
                             samples: list[Sample]) -> None:
    new = await (await stores.mongo()).samples.record_samples(samples)
    await evaluator.refresh_buffers({PAIR: Adapter()}, new)


async def stored(stores: StoreConnections) -> tuple[list[int], dict]:
    mongo = await stores.mongo()
    buffer = await mongo.buffers.get(*PAIR)
    assert buffer is not None
    (summary,) = await mongo.buffers.summaries()
    return [e.doc_id for e in buffer.entries], summary


async def test_merged_buffer_equals_a_recompute_and_keeps_the_newest_within_target(
    fresh_settings: Settings,
) -> None:
    settings = with_target(fresh_settings, 5)
    stores = StoreConnections(settings)
    evaluator = Evaluator(settings, stores)
    t0 = time.time() - 100
    await record_and_refresh(evaluator, stores, [sample(d, t0 + d) for d in range(3)])
    assert (await stored(stores))[0] == [0, 1, 2]
    # later batches are merged into what this process wrote (one failed doc among them)
    await record_and_refresh(evaluator, stores, [sample(3, t0 + 3, acc=0.0),
                                                 sample(4, t0 + 4, code=ErrorCode.NODE)])
    await record_and_refresh(evaluator, stores, [sample(5, t0 + 5), sample(6, t0 + 6)])
    entries, summary = await stored(stores)
    assert entries == [2, 3, 4, 5, 6], "oldest first, the newest 5 (the task's target)"
    assert summary["n"] == 5 and summary["n_ok"] == 4 and summary["error_rate"] == 0.2
    assert summary["metrics"]["acc,none"]["mean"] == 0.6  # a node error scores 0
    # a process that holds nothing recomputes from the samples: the same buffer
    mongo = await stores.mongo()
    rows = (await mongo.samples.latest_for_pairs({PAIR: 5}, since_ts=0))[PAIR]
    expected = summarize_buffer(*PAIR, rows, ["acc,none"], 0.0)
    assert {k: v for k, v in summary.items() if k != "updated_at"} == {
        k: v for k, v in expected.model_dump().items() if k != "updated_at"}
    await Evaluator(settings, StoreConnections(settings)).refresh_buffers({PAIR: Adapter()})
    assert await stored(stores) == (entries, {**summary, "updated_at": (await stored(stores))[1][
        "updated_at"]})
    await stores.close()


async def test_a_buffer_written_elsewhere_is_recomputed_not_overwritten(
    fresh_settings: Settings,
) -> None:
    stores = StoreConnections(fresh_settings)
    first = Evaluator(fresh_settings, stores)
    second = Evaluator(fresh_settings, StoreConnections(fresh_settings))
    t0 = time.time() - 100
    await record_and_refresh(first, stores, [sample(0, t0), sample(1, t0 + 1)])
    # another Evaluator (another process) scores a doc of the same pair and writes the buffer
    await record_and_refresh(second, stores, [sample(2, t0 + 2)])
    assert (await stored(stores))[0] == [0, 1, 2]
    # the first one's rows are out of date: merging into them would drop doc 2
    await record_and_refresh(first, stores, [sample(3, t0 + 3)])
    assert (await stored(stores))[0] == [0, 1, 2, 3]
    await record_and_refresh(second, stores, [sample(4, t0 + 4)])
    assert (await stored(stores))[0] == [0, 1, 2, 3, 4]
    await stores.close()


async def test_expired_samples_leave_a_merged_buffer(fresh_settings: Settings) -> None:
    settings = fresh_settings.model_copy(update={"manager": fresh_settings.manager.model_copy(
        update={"sample_ttl_s": 50.0})})
    stores = StoreConnections(settings)
    evaluator = Evaluator(settings, stores)
    now = time.time()
    await record_and_refresh(evaluator, stores, [sample(0, now - 49.5), sample(1, now - 10)])
    assert (await stored(stores))[0] == [0, 1]
    time.sleep(0.6)  # doc 0 is now older than the TTL
    await record_and_refresh(evaluator, stores, [sample(2, time.time())])
    entries, summary = await stored(stores)
    assert entries == [1, 2] and summary["n"] == 2
    await stores.close()


async def test_a_conditional_buffer_write_refuses_a_changed_revision(
    fresh_settings: Settings,
) -> None:
    stores = StoreConnections(fresh_settings)
    buffers = (await stores.mongo()).buffers
    summary = summarize_buffer(*PAIR, [], ["acc,none"], 0.0).model_dump()
    written = await buffers.set_summaries([(summary, [])])
    assert written is not None and (await buffers.revisions([PAIR]))[PAIR] == written[PAIR]
    again = await buffers.set_summaries([(summary, [])], expected={PAIR: written[PAIR]})
    assert again is not None and again[PAIR] != written[PAIR]
    # a writer still holding the first revision is refused and changes nothing
    assert await buffers.set_summaries([(summary, [])], expected={PAIR: written[PAIR]}) is None
    assert (await buffers.revisions([PAIR]))[PAIR] == again[PAIR]
    assert (await buffers.revisions([("n9", "gsm8k")])) == {("n9", "gsm8k"): None}
    await stores.close()


async def test_concurrent_scoring_calls_refresh_one_buffer_without_losing_samples(
    fresh_settings: Settings,
) -> None:
    """An Evaluator is an async actor: its scoring calls run concurrently."""
    import asyncio

    stores = StoreConnections(fresh_settings)
    evaluator = Evaluator(fresh_settings, stores)
    t0 = time.time() - 100
    await record_and_refresh(evaluator, stores, [sample(0, t0)])
    await asyncio.gather(*(record_and_refresh(evaluator, stores, [sample(d, t0 + d)])
                           for d in range(1, 9)))
    entries, summary = await stored(stores)
    assert entries == list(range(9)) and summary["n"] == 9
    await stores.close()
