"""Training data: snapshots from files and from PostgreSQL, packing, and shards that never
overlap between nodes or workers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.core.errors import DatasetError
from cluster.core.settings import StoreSettings
from cluster.train.config import DatasetSpec
from cluster.train.data import (
    DataCursor,
    PackedCorpus,
    ShardedBatches,
    read_snapshot,
    snapshot_dataset,
)

DOCS = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)]


async def test_jsonl_and_parquet_files_make_the_same_snapshot(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(DOCS), parquet)
    snaps = [await snapshot_dataset(DatasetSpec(files=[str(f)], text_fields=["q", "a"],
                                                separator=" -> "), tmp_path / f"{f.suffix}.out")
             for f in (jsonl, parquet)]
    assert snaps[0].sha256 == snaps[1].sha256 and snaps[0].documents == 5
    assert read_snapshot(snaps[0].path)[2] == "question 2 -> answer 2"
    # a snapshot is kept: a resumed run trains on the bytes it started with
    jsonl.write_text(json.dumps({"q": "changed", "a": "!"}) + "\n")
    again = await snapshot_dataset(DatasetSpec(files=[str(jsonl)], text_fields=["q", "a"]),
                                   Path(snaps[0].path))
    assert again.sha256 == snaps[0].sha256


async def test_a_missing_field_names_the_document(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"doc 0: no field 'a'"):
        await snapshot_dataset(DatasetSpec(files=[str(f)], text_fields=["q", "a"]),
                               tmp_path / "out.jsonl")


async def test_a_task_dataset_comes_from_postgresql(loaded_stores: StoreSettings,
                                                    tmp_path: Path) -> None:
    spec = DatasetSpec(task="gsm8k", split="train", text_fields=["question", "answer"],
                       max_docs=10)
    snap = await snapshot_dataset(spec, tmp_path / "docs.jsonl", loaded_stores.postgres_url)
    first = json.loads(Path(__file__).parents[3].joinpath(
        "datasets/gsm8k/train.jsonl").read_text().splitlines()[0])
    assert snap.documents == 10
    assert read_snapshot(snap.path)[0] == f"{first['question']}\n{first['answer']}"
    with pytest.raises(DatasetError, match="not loaded in PostgreSQL"):
        await snapshot_dataset(DatasetSpec(task="nope"), tmp_path / "x.jsonl",
                               loaded_stores.postgres_url)


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict:
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_packing_and_shards() -> None:
    corpus = PackedCorpus.pack(["abcdefg"] * 9, CharTokenizer(), seq_len=8, heldout_blocks=1)
    assert corpus.train.shape == (8, 8) and corpus.heldout.shape == (1, 8)
    assert corpus.train[0].tolist() == [97, 98, 99, 100, 101, 102, 103, 0]  # eos between docs
    seen: list[int] = []
    for node in range(2):
        for rank in range(2):
            shard = ShardedBatches(corpus.train, 3, node, 2, rank, 2, 1).shard(0)
            seen += shard.tolist()
    assert sorted(seen) == list(range(8))  # every block once, no overlap
    batches = ShardedBatches(torch.arange(8).view(8, 1), 3, 0, 1, 0, 1, 3)
    cursor = DataCursor()
    epochs = []
    for _ in range(4):
        _, cursor = batches.next(cursor)
        epochs.append(cursor.epoch)
    assert epochs == [0, 0, 1, 1]  # 8 blocks make 2 whole batches of 3 per epoch
    with pytest.raises(DatasetError, match="fewer than micro_batch_size"):
        ShardedBatches(corpus.train, 0, 0, 4, 0, 2, 2)
