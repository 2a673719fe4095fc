"""Training data: documents from files or PostgreSQL, one snapshot per run, tokenized and
packed into blocks, sharded by node and worker, read in a seeded order from a cursor.

The snapshot (``{"text": ...}`` JSON lines in the run's directory, with its sha256) is what
every worker reads, so a resumed run trains on the same bytes even if the source changed.
Packing: each document's tokens, then the end-of-sequence token, concatenated and cut into
blocks of ``seq_len``; the last ``heldout_blocks`` blocks are held out. Order: a permutation
of the training blocks drawn from (seed, epoch); node ``i`` of ``n`` takes every n-th block
of it from ``i``, worker ``r`` of ``w`` every w-th of those. The cursor (epoch, offset) is
all a checkpoint needs to continue exactly where the run was.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from cluster.core.errors import DatasetError
from cluster.train.config import DatasetSpec

if TYPE_CHECKING:
    import torch


def doc_text(doc: Mapping[str, Any], fields: list[str], separator: str, where: str) -> str:
    missing = [f for f in fields if f not in doc]
    if missing:
        raise DatasetError(f"{where}: no field {missing[0]!r} (fields: {sorted(doc)[:10]})")
    return separator.join(str(doc[f]) for f in fields)


def read_file_docs(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSON-lines or parquet file, as dicts."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file {p} does not exist")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(p).iter_batches():
            yield from batch.to_pylist()
        return
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DatasetError(f"{p}:{n}: not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise DatasetError(f"{p}:{n}: a JSON {type(row).__name__}, not an object")
            yield row


async def read_task_docs(postgres_url: str, task: str, split: str) -> list[dict[str, Any]]:
    """Every doc of a task dataset's split in PostgreSQL (``testbench datasets load``)."""
    from cluster.storage.postgres import DatasetStore

    store = await DatasetStore.connect(postgres_url, max_size=2, ensure_schema=False)
    try:
        if await store.get_registry(task) is None:
            raise DatasetError(f"task {task!r} is not loaded in PostgreSQL "
                               "(testbench datasets load)")
        docs = await store.fetch_split(task, split)
    finally:
        await store.close()
    if not docs:
        raise DatasetError(f"task {task!r} has no docs in split {split!r}")
    return docs


class DataSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    documents: int
    sha256: str


def write_snapshot(spec: DatasetSpec, docs: Iterable[Mapping[str, Any]], out: Path,
                   source: str) -> DataSnapshot:
    """Write the documents' texts as JSON lines to ``out`` (atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            if spec.max_docs is not None and count >= spec.max_docs:
                break
            line = json.dumps({"text": doc_text(doc, spec.text_fields, spec.separator,
                                                f"{source} doc {i}")}, ensure_ascii=False) + "\n"
            digest.update(line.encode("utf-8"))
            f.write(line)
            count += 1
    if count == 0:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"{source}: no documents")
    os.replace(tmp, out)
    return DataSnapshot(path=str(out), documents=count, sha256=digest.hexdigest())


async def snapshot_dataset(spec: DatasetSpec, out: Path,
                           postgres_url: str | None = None) -> DataSnapshot:
    """The run's data snapshot from its source (kept when it already exists: a resumed run
    trains on the bytes it started with)."""
    if out.is_file():
        data = out.read_bytes()
        return DataSnapshot(path=str(out), documents=data.count(b"\n"),
                            sha256=hashlib.sha256(data).hexdigest())
    if spec.task is not None:
        if not postgres_url:
            raise DatasetError(f"dataset.task {spec.task!r} needs PostgreSQL: set the node's "
                               "training.postgres_url (or TESTBENCH_POSTGRES_URL)")
        docs: Iterable[Mapping[str, Any]] = await read_task_docs(postgres_url, spec.task,
                                                                 spec.split)
        return write_snapshot(spec, docs, out, f"task {spec.task}/{spec.split}")

    def all_files() -> Iterator[dict[str, Any]]:
        for path in spec.files:
            yield from read_file_docs(path)

    return write_snapshot(spec, all_files(), out, ", ".join(spec.files))


def read_snapshot(path: str | Path) -> list[str]:
    return [row["text"] for row in read_file_docs(path)]


@dataclass(frozen=True)
class PackedCorpus:
    """Blocks of token ids: ``train`` (n, seq_len) and ``heldout`` (heldout_blocks, seq_len)."""

    train: torch.Tensor
    heldout: torch.Tensor

    @classmethod
    def pack(cls, texts: list[str], tokenizer: Any, seq_len: int,
             heldout_blocks: int) -> PackedCorpus:
        import torch

        eos = tokenizer.eos_token_id
        if eos is None:
            raise DatasetError("the tokenizer has no end-of-sequence token to separate documents")
        ids: list[int] = []
        for start in range(0, len(texts), 256):
            for row in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
                ids.extend(row)
                ids.append(eos)
        blocks = len(ids) // seq_len
        if blocks <= heldout_blocks:
            raise DatasetError(f"{len(ids)} tokens make {blocks} blocks of {seq_len}: not more "
                               f"than the {heldout_blocks} held out")
        packed = torch.tensor(ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)
        return cls(train=packed[: blocks - heldout_blocks], heldout=packed[blocks - heldout_blocks:])


class DataCursor(BaseModel):
    """Where a worker is in its shard: the epoch and the next block of it."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = 0
    offset: int = 0


class ShardedBatches:
    """One worker's batches of ``micro_batch_size`` blocks, in the run's seeded order."""

    def __init__(self, blocks: torch.Tensor, seed: int, node_index: int, node_count: int,
                 rank: int, world_size: int, micro_batch_size: int) -> None:
        self._blocks = blocks
        self._seed = seed
        self._node = (node_index, node_count)
        self._worker = (rank, world_size)
        self._mbs = micro_batch_size
        self._cached: tuple[int, torch.Tensor] | None = None
        shard = len(range(node_index, len(blocks), node_count))
        shard = len(range(rank, shard, world_size))
        if shard < micro_batch_size:
            raise DatasetError(f"worker {rank}/{world_size} of node {node_index}/{node_count} "
                               f"gets {shard} of {len(blocks)} blocks, fewer than "
                               f"micro_batch_size {micro_batch_size}: more data or smaller blocks")

    def shard(self, epoch: int) -> torch.Tensor:
        """The block indices of this worker in ``epoch``."""
        import torch

        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
            order = torch.randperm(len(self._blocks), generator=g)
            node_index, node_count = self._node
            rank, world = self._worker
            self._cached = (epoch, order[node_index::node_count][rank::world])
        return self._cached[1]

    def next(self, cursor: DataCursor) -> tuple[torch.Tensor, DataCursor]:
        shard = self.shard(cursor.epoch)
        if cursor.offset + self._mbs > len(shard):
            cursor = DataCursor(epoch=cursor.epoch + 1, offset=0)
            shard = self.shard(cursor.epoch)
        idx = shard[cursor.offset: cursor.offset + self._mbs]
        return self._blocks[idx], DataCursor(epoch=cursor.epoch, offset=cursor.offset + self._mbs)
