"""Stores against real servers: the embedded ones (cluster.local.embedded) and "external" ones
started separately (pgserver's own API, the nx-27017 console script) and passed by URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pymongo import AsyncMongoClient

from cluster.core.errors import DatasetError, ErrorCode, RegistrationError
from cluster.core.evaluations import EvalSample, EvaluationRun, EvaluationSpec
from cluster.core.schemas import Node, Prompt, Relay, Sample, prompt_id, sample_key
from cluster.core.settings import PROJECT_ROOT, StoreSettings
from cluster.local.embedded import (
    EmbeddedMongo,
    EmbeddedPostgres,
    EmbeddedServerError,
    EmbeddedStores,
)
from cluster.storage.mongo import BufferEntry, EvaluationStore, MongoStores
from cluster.storage.postgres import DatasetStore, dataset_table_name
from cluster.tasks.datasets import load_task_datasets, load_user_file, read_rows
from cluster.testing.stores import ExternalMongo, ExternalPostgres


def _datasets_dir() -> Path:
    for candidate in (PROJECT_ROOT / "datasets", Path("/work/shared/datasets")):
        if (candidate / "gsm8k" / "test.jsonl").is_file() and (candidate / "openbookqa" / "test.jsonl").is_file():
            return candidate
    raise AssertionError("no gsm8k/openbookqa dataset files in datasets/")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


# -- servers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["embedded", "external"])
def store_settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSettings]:
    base = tmp_path_factory.mktemp(f"stores-{request.param}")
    if request.param == "embedded":
        stores = EmbeddedStores(StoreSettings(data_dir=base))
        settings = stores.start()
        assert sorted(stores.started) == ["mongo", "postgres"]
        try:
            yield settings
        finally:
            stores.stop()
        return
    pg = ExternalPostgres(base / "ext-postgres")
    mongo = ExternalMongo(base / "ext-mongo")
    try:
        pg_url, mongo_url = pg.start(), mongo.start()
        unused = base / "unused-data-dir"
        stores = EmbeddedStores(StoreSettings(data_dir=unused, postgres_url=pg_url, mongo_url=mongo_url))
        settings = stores.start()
        assert stores.started == []
        assert (settings.postgres_url, settings.mongo_url) == (pg_url, mongo_url)
        assert "?host=" in pg_url  # pgserver's own unix-socket URL form works with asyncpg
        assert not unused.exists()
        yield settings
    finally:
        mongo.stop()
        pg.stop()


@pytest.fixture(scope="module")
async def datasets(store_settings: StoreSettings) -> AsyncIterator[DatasetStore]:
    assert store_settings.postgres_url
    store = await DatasetStore.connect(store_settings.postgres_url)
    try:
        yield store
    finally:
        await store.close()


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def mongo(store_settings: StoreSettings) -> AsyncIterator[MongoStores]:
    assert store_settings.mongo_url
    stores = await MongoStores.connect(store_settings.mongo_url, f"t_{uuid.uuid4().hex[:12]}", clock=Clock())
    try:
        yield stores
    finally:
        await stores.client.drop_database(stores.database.name)
        await stores.close()


# -- datasets in PostgreSQL ----------------------------------------------------------------------
async def test_project_datasets_load_once_and_read_back(datasets: DatasetStore) -> None:
    ddir = _datasets_dir()
    started = time.monotonic()
    results = {r.task: r for r in await load_task_datasets(datasets, ddir, ["gsm8k", "openbookqa"])}
    first_load_s = time.monotonic() - started
    assert results["gsm8k"].splits == {"test": 1319, "train": 7473}
    assert results["openbookqa"].splits == {"test": 500}
    assert first_load_s < 30

    again = await load_task_datasets(datasets, ddir, ["gsm8k", "openbookqa"])
    assert [r.loaded for r in again] == [False, False]
    assert [r.sha256 for r in again] == [results["gsm8k"].sha256, results["openbookqa"].sha256]

    entry = await datasets.get_registry("gsm8k")
    assert entry is not None
    assert (entry.n_docs, entry.splits, entry.table_name) == (8792, {"test": 1319, "train": 7473}, dataset_table_name("gsm8k"))
    assert [e.task_name for e in await datasets.list_registry()][:2] == ["gsm8k", "openbookqa"]

    rows = read_rows(ddir / "gsm8k" / "test.jsonl")
    assert await datasets.count_docs("gsm8k", "test") == 1319
    assert await datasets.doc_ids("gsm8k", "test") == list(range(1319))
    assert await datasets.fetch_split("gsm8k", "test") == rows
    assert await datasets.fetch_docs("gsm8k", "test", [0, 7, 1318]) == {0: rows[0], 7: rows[7], 1318: rows[1318]}
    obqa = await datasets.fetch_docs("openbookqa", "test", [0])
    assert obqa[0]["question"]["choices"][0]["label"] == "A"


async def test_dataset_reads_report_unknown_tasks_and_ids(datasets: DatasetStore) -> None:
    with pytest.raises(DatasetError, match="task 'no-such-task' has no dataset loaded"):
        await datasets.doc_ids("no-such-task", "test")
    await datasets.register_dataset("ids-task", {"test": [{"i": 0}, {"i": 1}]}, "sha-ids")
    with pytest.raises(DatasetError, match=r"no docs with ids \[5, 9\]"):
        await datasets.fetch_docs("ids-task", "test", [1, 5, 9])
    assert await datasets.fetch_split("ids-task", "validation") == []
    assert await datasets.get_registry("no-such-task") is None


async def test_changed_dataset_is_replaced_atomically(datasets: DatasetStore) -> None:
    task = "Replace Me/v1"  # not a valid identifier: the table name is derived safely
    assert await datasets.register_dataset(task, {"test": [{"v": 1}, {"v": 2}]}, "sha-1") is True
    assert await datasets.register_dataset(task, {"test": [{"v": 9}]}, "sha-1") is False  # same sha: no-op
    assert await datasets.fetch_split(task, "test") == [{"v": 1}, {"v": 2}]

    assert await datasets.register_dataset(task, {"test": [{"v": 3}], "train": [{"v": 4}]}, "sha-2") is True
    assert await datasets.fetch_split(task, "test") == [{"v": 3}]
    entry = await datasets.get_registry(task)
    assert entry is not None and (entry.sha256, entry.splits) == ("sha-2", {"test": 1, "train": 1})

    # A load that fails half-way (PostgreSQL rejects \u0000 in jsonb) changes nothing.
    with pytest.raises(DatasetError, match="nothing was changed"):
        await datasets.register_dataset(task, {"test": [{"v": 5}, {"v": "bad\u0000"}]}, "sha-3")
    assert await datasets.fetch_split(task, "test") == [{"v": 3}]
    entry = await datasets.get_registry(task)
    assert entry is not None and entry.sha256 == "sha-2"


async def test_concurrent_loads_of_one_dataset_load_it_once(datasets: DatasetStore) -> None:
    docs = {"test": [{"n": i} for i in range(500)]}
    outcomes = await asyncio.gather(*(datasets.register_dataset("race", docs, "sha-race") for _ in range(4)))
    assert sorted(outcomes) == [False, False, False, True]
    assert await datasets.count_docs("race", "test") == 500


async def test_user_csv_file_loads_into_postgres(datasets: DatasetStore, tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhat is 2+2?,4\nCapital of France?,Paris\n")
    result = await load_user_file(datasets, "user-qa", path, split="test")
    assert (result.splits, result.loaded) == ({"test": 2}, True)
    assert await datasets.fetch_docs("user-qa", "test", [1]) == {1: {"question": "Capital of France?", "answer": "Paris"}}
    assert (await load_user_file(datasets, "user-qa", path, split="test")).loaded is False


# -- MongoDB ---------------------------------------------------------------------------------
def _node(node_id: str = "node-1", **kw: Any) -> Node:
    return Node.model_validate({"node_id": node_id, "url": f"http://127.0.0.1:9000/{node_id}", "model": "m", **kw})


async def test_nodes_registry(mongo: MongoStores) -> None:
    added = await mongo.nodes.add(_node("b-node", tasks=["gsm8k"]))
    await mongo.nodes.add({"node_id": "a-node", "url": "http://10.0.0.1:8000", "model": "SmolLM2"})
    assert await mongo.nodes.get("b-node") == added

    with pytest.raises(RegistrationError, match="node 'b-node' is already registered"):
        await mongo.nodes.add(_node("b-node"))
    with pytest.raises(RegistrationError, match=r"invalid node: node_id: String should match pattern.*; url: Input should be a valid URL"):
        await mongo.nodes.add({"node_id": "bad id!", "url": "not a url", "model": "m"})
    with pytest.raises(RegistrationError, match="invalid node: model: Field required"):
        await mongo.nodes.add({"node_id": "c", "url": "http://x"})

    assert [n.node_id for n in await mongo.nodes.list()] == ["a-node", "b-node"]
    assert await mongo.nodes.set_enabled("a-node", False) is True
    assert await mongo.nodes.set_enabled("ghost", False) is False
    node = await mongo.nodes.get("a-node")
    assert node is not None and node.enabled is False  # a real bool, whatever the server stored
    assert [n.node_id for n in await mongo.nodes.list(enabled_only=True)] == ["b-node"]
    assert await mongo.nodes.set_enabled("a-node", True) is True
    assert len(await mongo.nodes.list(enabled_only=True)) == 2

    assert await mongo.nodes.remove("a-node") is True
    assert await mongo.nodes.remove("a-node") is False
    assert await mongo.nodes.get("a-node") is None

    # a fleet in one bulk insert: taken ids are skipped, the first registration stays
    assert await mongo.nodes.add_many([_node("b-node", tasks=["x"]), _node("c-node")]) == 1
    assert await mongo.nodes.get("b-node") == added
    assert [n.node_id for n in await mongo.nodes.list()] == ["b-node", "c-node"]


def _prompts(node_id: str, task: str, doc_id: int, n: int, created_at: float) -> list[Prompt]:
    key = sample_key(node_id, task, doc_id, 0)
    return [
        Prompt(
            prompt_id=prompt_id(key, i), sample_key=key, node_id=node_id, task=task, doc_id=doc_id,
            request_index=i, n_requests=n, path="/v1/completions",
            body={"prompt": f"doc {doc_id} choice {i}", "max_tokens": 1, "echo": True}, created_at=created_at,
        )
        for i in range(n)
    ]


def _relay(p: Prompt, *, error_code: ErrorCode = ErrorCode.OK, text: str = "ok") -> Relay:
    return Relay(
        prompt_id=p.prompt_id, sample_key=p.sample_key, node_id=p.node_id, task=p.task, doc_id=p.doc_id,
        request_index=p.request_index, error_code=error_code, status=200,
        response={"choices": [{"text": text, "logprobs": {"token_logprobs": [None, -0.5]}}]},
        latency_s=0.1, started_at=p.created_at, finished_at=p.created_at + 0.1,
    )


async def test_prompts_are_idempotent_and_pending_until_their_sample_is_recorded(
    mongo: MongoStores,
) -> None:
    doc1 = _prompts("n1", "openbookqa", 1, 4, created_at=10.0)
    doc2 = _prompts("n1", "openbookqa", 2, 4, created_at=20.0)
    assert await mongo.prompts.insert_many(doc1 + doc2) == 8
    assert await mongo.prompts.insert_many(doc2 + doc1[:1]) == 0  # replayed sampler step
    assert await mongo.prompts.get([doc2[1].prompt_id, "missing", doc1[0].prompt_id]) == [doc2[1], doc1[0]]

    grouped = await mongo.prompts.by_sample_keys([doc2[0].sample_key, doc1[0].sample_key, "nope"])
    assert grouped == {doc1[0].sample_key: doc1, doc2[0].sample_key: doc2}

    # Pending (to re-drive) until their samples are recorded, and only once old enough.
    pending = await mongo.prompts.pending_sample_keys(older_than=30.0)
    assert sorted(k for k, _, _ in pending) == sorted({doc1[0].sample_key, doc2[0].sample_key})
    assert [k for k, _, _ in await mongo.prompts.pending_sample_keys(older_than=15.0)] == [
        doc1[0].sample_key]
    await mongo.prompts.mark_done([p.prompt_id for p in doc1])
    assert [k for k, _, _ in await mongo.prompts.pending_sample_keys(older_than=30.0)] == [
        doc2[0].sample_key]


async def test_relays_keep_the_first_answer_per_prompt(mongo: MongoStores) -> None:
    prompts = _prompts("n1", "gsm8k", 5, 2, created_at=1.0)
    await mongo.prompts.insert_many(prompts)
    first = [_relay(prompts[0], text="first"), _relay(prompts[1], error_code=ErrorCode.NODE, text="")]
    assert await mongo.relays.record_relays(first) == first
    replay = [_relay(prompts[0], text="second"), _relay(prompts[1], text="second")]
    assert await mongo.relays.record_relays(replay) == []
    stored = await mongo.relays.get_for_prompts([p.prompt_id for p in prompts] + ["missing"])
    assert stored == {prompts[0].prompt_id: first[0], prompts[1].prompt_id: first[1]}
    assert stored[prompts[1].prompt_id].error_code is ErrorCode.NODE
    assert await mongo.relays.count() == 2
    assert await mongo.relays.count(node_id="n1", task="gsm8k") == 2
    assert await mongo.relays.count(node_id="other") == 0


async def test_untrusted_responses_mongodb_cannot_hold_are_kept_anyway(mongo: MongoStores) -> None:
    prompts = _prompts("n1", "gsm8k", 9, 4, created_at=1.0)
    deep: dict[str, Any] = {}
    cursor = deep
    for _ in range(150):
        cursor["x"] = {}
        cursor = cursor["x"]
    responses: list[dict[str, Any]] = [
        {"id": 2**70, "choices": []},  # over 64 bits
        {"text": "lone surrogate \ud83d"},
        deep,
        {"text": "x" * (16 * 1024 * 1024)},  # over MongoDB's document limit
    ]
    relays = [_relay(p).model_copy(update={"response": r}) for p, r in zip(prompts, responses, strict=True)]
    assert await mongo.relays.record_relays(relays) == relays
    stored = await mongo.relays.get_for_prompts([p.prompt_id for p in prompts])
    for relay in relays[:3]:
        assert stored[relay.prompt_id] == relay  # restored exactly
    too_big = stored[prompts[3].prompt_id]
    assert too_big.response is None and too_big.error is not None and "response not stored" in too_big.error


def _sample(node_id: str, task: str, doc_id: int, created_at: float, code: ErrorCode = ErrorCode.OK) -> Sample:
    return Sample(
        sample_key=sample_key(node_id, task, doc_id, 0), node_id=node_id, task=task, doc_id=doc_id, epoch=0,
        error_code=code, metrics={"exact_match,strict-match": 1.0 if doc_id % 2 else 0.0} if code == ErrorCode.OK else {},
        latency_s=0.5, created_at=created_at,
    )


async def test_samples_record_returns_only_new_ones(mongo: MongoStores) -> None:
    batch = [_sample("n1", "gsm8k", i, created_at=100.0 + i) for i in range(5)]
    assert await mongo.samples.record_samples(batch) == batch
    assert await mongo.samples.record_samples(batch) == []  # replayed evaluation
    more = [_sample("n1", "gsm8k", 7, 200.0, ErrorCode.NODE), _sample("n1", "gsm8k", 8, 201.0, ErrorCode.RELAY)]
    assert await mongo.samples.record_samples([batch[0], *more, more[0]]) == more
    await mongo.samples.record_samples([_sample("n2", "gsm8k", 1, 150.0), _sample("n1", "openbookqa", 1, 150.0)])

    valid = await mongo.samples.valid_since("n1", "gsm8k", 102.0)
    assert [s.doc_id for s in valid] == [3, 4, 7]  # newer than 102, bench-side RELAY failure excluded
    assert valid[-1].error_code is ErrorCode.NODE
    every = await mongo.samples.valid_since("n1", "gsm8k", 102.0, counted_only=False)
    assert [s.doc_id for s in every] == [3, 4, 7, 8]
    assert every[0] == batch[3]

    assert await mongo.samples.count() == 9
    assert await mongo.samples.count(node_id="n1", task="gsm8k") == 7
    assert await mongo.samples.count(node_id="n1", task="gsm8k", since_ts=150.0, counted_only=True) == 1
    assert await mongo.samples.keys_for("n1", "gsm8k") == {s.sample_key for s in [*batch, *more]}
    assert await mongo.samples.keys_for("n9", "gsm8k") == set()


async def test_buffers_keep_the_last_n_entries(mongo: MongoStores) -> None:
    clock = mongo.buffers._clock
    assert isinstance(clock, Clock)
    entries = [BufferEntry.from_sample(_sample("n1", "gsm8k", i, created_at=float(i))) for i in range(7)]

    await mongo.buffers.push("n1", "gsm8k", entries[:2], size=4)
    clock.now = 2_000.0
    await mongo.buffers.push("n1", "gsm8k", entries[2:5], size=4)
    buf = await mongo.buffers.get("n1", "gsm8k")
    assert buf is not None
    assert [e.doc_id for e in buf.entries] == [1, 2, 3, 4]
    assert buf.entries[1] == entries[2] and buf.updated_at == 2_000.0

    await mongo.buffers.push("n1", "gsm8k", [entries[5].model_dump(), entries[6]], size=4)
    buf = await mongo.buffers.get("n1", "gsm8k")
    assert buf is not None and [e.doc_id for e in buf.entries] == [3, 4, 5, 6]
    await mongo.buffers.push("n1", "gsm8k", entries[:1], size=2)  # a smaller size trims further
    buf = await mongo.buffers.get("n1", "gsm8k")
    assert buf is not None and [e.doc_id for e in buf.entries] == [6, 0]
    assert buf.entries[0].metrics == {"exact_match,strict-match": 0.0}

    await mongo.buffers.push("n2", "gsm8k", [entries[0]], size=50)
    await mongo.buffers.push("n1", "gsm8k", [], size=50)  # nothing to add: no write
    assert [(b.node_id, b.task, len(b.entries)) for b in await mongo.buffers.all()] == [
        ("n1", "gsm8k", 2), ("n2", "gsm8k", 1),
    ]
    assert await mongo.buffers.get("n3", "gsm8k") is None
    with pytest.raises(ValueError, match="buffer size"):
        await mongo.buffers.push("n1", "gsm8k", entries[:1], size=0)


async def test_buffer_entries_stored_as_subdocuments_are_read_too(mongo: MongoStores) -> None:
    entry = BufferEntry.from_sample(_sample("n1", "t", 1, created_at=5.0))
    await mongo.buffers.collection.insert_one(
        {"_id": "n1|t", "node_id": "n1", "task": "t", "entries": [entry.model_dump(mode="json")], "updated_at": 1.0}
    )
    await mongo.buffers.push("n1", "t", [entry.model_copy(update={"doc_id": 2})], size=10)
    buf = await mongo.buffers.get("n1", "t")
    assert buf is not None and [e.doc_id for e in buf.entries] == [1, 2]


async def test_an_unmeasurable_mark_sits_beside_the_buffer_until_the_pair_measures(
    mongo: MongoStores,
) -> None:
    # a pair with samples keeps them while it is marked; one without gets a bare document
    summary = {"node_id": "n1", "task": "gsm8k", "n": 1, "error_rate": 0.0}
    entry = BufferEntry.from_sample(_sample("n1", "gsm8k", 1, created_at=5.0))
    await mongo.buffers.set_summary(summary, [entry])
    first = await mongo.buffers.mark_unmeasurable("n1", "gsm8k", "tokenizer gone", 1, now=10.0)
    await mongo.buffers.mark_unmeasurable("n2", "gsm8k", "no docs", 1, now=11.0)
    again = await mongo.buffers.mark_unmeasurable("n1", "gsm8k", "tokenizer gone", 2, now=20.0)
    assert (first.since, again.since, again.last_attempt_at, again.attempts) == (10.0, 10.0, 20.0, 2)
    marks = await mongo.buffers.unmeasurable()
    assert [(m.node_id, m.reason, m.attempts) for m in marks] == [
        ("n1", "tokenizer gone", 2), ("n2", "no docs", 1)]
    assert [r["node_id"] for r in await mongo.buffers.summaries()] == ["n1"]
    buf = await mongo.buffers.get("n1", "gsm8k")
    assert buf is not None and [e.doc_id for e in buf.entries] == [1]
    assert await mongo.buffers.get("n2", "gsm8k") is not None  # entries: none
    # measuring again: the Manager clears it, and a rewritten summary drops it
    assert await mongo.buffers.clear_unmeasurable("n2", "gsm8k")
    assert not await mongo.buffers.clear_unmeasurable("n2", "gsm8k")
    await mongo.buffers.set_summary(summary, [entry])
    assert await mongo.buffers.unmeasurable() == []


async def test_evaluation_runs_are_one_store_on_mongo_stores(mongo: MongoStores) -> None:
    spec = EvaluationSpec(endpoint="http://127.0.0.1:9/v1/completions", model="m", tasks=["t"])
    run = EvaluationRun(run_id="r1", tenant="a", spec=spec, created_at=1.0, updated_at=1.0)
    await mongo.evaluations.create(run)

    def cancel(r: EvaluationRun) -> bool:
        r.cancel_requested = True
        return True

    # another EvaluationStore on the same MongoStores (its own clock) sees the same run
    other = EvaluationStore(mongo, clock=lambda: 7.0)
    changed = await other.mutate("r1", cancel)
    assert changed is not None and changed.rev == 1 and changed.updated_at == 7.0
    stored = await mongo.evaluations.get("r1")
    assert stored is not None and stored.cancel_requested and stored.spec.endpoint == "http://127.0.0.1:9"
    sample = EvalSample(run_id="r1", task="t", doc_id=0, error_code=ErrorCode.OK, created_at=1.0)
    assert await mongo.evaluations.record_samples([sample, sample]) == 1
    assert await other.record_samples([sample]) == 0
    line = await mongo.evaluations.append_log("r1", "hello")
    assert line.ts == 1_000.0  # MongoStores' clock
    assert [x.message for x in await other.logs_after("r1")] == ["hello"]


# -- embedded servers' lifecycle ---------------------------------------------------------------
async def test_embedded_servers_restart_on_the_same_data(tmp_path: Path) -> None:
    pg, mg = EmbeddedPostgres(tmp_path), EmbeddedMongo(tmp_path)
    pg_url, mongo_url = pg.start(), mg.start()
    assert pg.start() == pg_url and mg.start() == mongo_url  # idempotent
    assert pg_url.startswith("postgresql://postgres@127.0.0.1:") and mongo_url.startswith("mongodb://127.0.0.1:")
    pids = [pg.pid, mg.pid]
    assert all(isinstance(p, int) for p in pids)

    datasets = await DatasetStore.connect(pg_url)
    await datasets.register_dataset("kept", {"test": [{"q": "still here"}]}, "sha")
    await datasets.close()
    stores = await MongoStores.connect(mongo_url, "testbench")
    await stores.nodes.add(_node("kept-node"))
    await stores.close()

    pg.stop()
    mg.stop()
    pg.stop()  # idempotent
    mg.stop()
    assert pg.url is None and mg.url is None
    assert _wait_gone([p for p in pids if p is not None], timeout_s=5)
    assert (tmp_path / "postgres" / "PG_VERSION").is_file() and (tmp_path / "mongo" / "testbench.db").is_file()

    try:
        pg_url, mongo_url = pg.start(), mg.start()
        datasets = await DatasetStore.connect(pg_url)
        assert await datasets.fetch_split("kept", "test") == [{"q": "still here"}]
        await datasets.close()
        stores = await MongoStores.connect(mongo_url, "testbench")
        assert [n.node_id for n in await stores.nodes.list()] == ["kept-node"]
        await stores.close()
    finally:
        pg.stop()
        mg.stop()


def test_start_failure_reports_the_server_log(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match=r"(?s)embedded mongo exited.*Log tail.*address already in use"):
            EmbeddedMongo(tmp_path, port=port).start()
        with pytest.raises(EmbeddedServerError, match=r"(?s)embedded postgres exited.*Log tail.*could not bind"):
            EmbeddedPostgres(tmp_path, port=port).start()


def test_a_data_dir_has_one_owner(tmp_path: Path) -> None:
    first = EmbeddedMongo(tmp_path)
    first.start()
    try:
        with pytest.raises(EmbeddedServerError, match="is in use by another process"):
            EmbeddedMongo(tmp_path).start()
    finally:
        first.stop()


_OWNER = """
import json, sys, threading, time
from pathlib import Path
from cluster.core.settings import StoreSettings
from cluster.local.embedded import EmbeddedStores
stores = EmbeddedStores(StoreSettings(data_dir=Path(sys.argv[1])))
if sys.argv[2] == "thread":  # no parent-death signal from a worker thread: orphans stay
    t = threading.Thread(target=stores.start)
    t.start()
    t.join()
else:
    stores.start()
print(json.dumps([stores.postgres.pid, stores.mongo.pid]), flush=True)
time.sleep(300)
"""


def _owner_pids(data_dir: Path, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(data_dir), mode], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "owner process did not start its servers"
    return proc, json.loads(line)


def test_servers_die_with_their_owner(tmp_path: Path) -> None:
    owner, pids = _owner_pids(tmp_path, "main")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert _wait_gone(pids), f"servers {pids} outlived their owner"


def test_orphans_of_a_dead_owner_are_replaced(tmp_path: Path) -> None:
    owner, pids = _owner_pids(tmp_path, "thread")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    time.sleep(0.5)
    assert all(_alive(p) for p in pids)  # orphans, as after a crash
    stores = EmbeddedStores(StoreSettings(data_dir=tmp_path))
    try:
        settings = stores.start()
        assert _wait_gone(pids, timeout_s=5)
        assert settings.postgres_url and settings.mongo_url

        async def check() -> None:
            conn = await asyncpg.connect(settings.postgres_url)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_url)
            assert (await client.admin.command("ping"))["ok"] == 1
            await client.close()

        asyncio.run(check())
    finally:
        stores.stop()
        for pid in pids:  # never leave a stray server behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_loops_embedded_stores_take_its_cpu_policy(tmp_path: Path) -> None:
    """Stores that ``testbench run`` starts serve the loop: every process of each server
    (PostgreSQL's forked backends too) runs under ``ray.loop_cpu_policy`` ("idle" by
    default), so a model served on the same machine is not preempted by them, and they
    still answer."""

    from cluster.core.settings import Settings
    from cluster.local.bootstrap import stores_running

    settings = Settings(stores=StoreSettings(data_dir=tmp_path))
    assert settings.ray.loop_cpu_policy == "idle"

    async def query(s: StoreSettings) -> None:
        assert s.postgres_url and s.mongo_url
        conn = await asyncpg.connect(s.postgres_url)
        try:
            assert await conn.fetchval("SELECT 41 + 1") == 42
        finally:
            await conn.close()
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(s.mongo_url)
        try:
            await client["t"]["c"].insert_one({"x": 1})
            assert await client["t"]["c"].count_documents({}) == 1
        finally:
            await client.close()

    with stores_running(settings) as running:
        asyncio.run(query(running.stores))
        servers = _servers_under(tmp_path)
        assert len(servers) >= 2, [p.cmdline() for p in servers]
        for proc in servers:
            for thread in proc.threads():
                try:
                    assert os.sched_getscheduler(thread.id) == os.SCHED_IDLE, proc.cmdline()
                except ProcessLookupError:  # ended meanwhile
                    continue
    # a store started for anything else keeps the OS default
    with EmbeddedStores(StoreSettings(data_dir=tmp_path / "other")):
        servers = _servers_under(tmp_path / "other")
        assert len(servers) >= 2
        assert {os.sched_getscheduler(p.pid) for p in servers} == {os.SCHED_OTHER}


def _servers_under(data_dir: Path) -> list[Any]:
    """The processes of the servers whose command line names ``data_dir``, and theirs."""
    import psutil

    found: dict[int, Any] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if str(data_dir) in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                for p in [proc, *proc.children(recursive=True)]:
                    found[p.pid] = p
    return list(found.values())
