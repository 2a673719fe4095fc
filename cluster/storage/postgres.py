"""Task datasets in PostgreSQL, over an asyncpg pool.

- ``task_registry(task_name PK, table_name, n_docs, splits JSONB split→count, sha256,
  loaded_at)``: one row per loaded task dataset;
- one table per task dataset ``(__id INT, __split TEXT, doc JSONB, PK(__split, __id))``;
  ``__id`` is the doc's position in its split (0-based), so doc ids are stable for as long
  as the dataset's sha256 is.

``register_dataset`` is idempotent (same sha256: nothing happens) and replaces a changed
dataset atomically: readers see either the old docs and registry row or the new ones.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict

from cluster.core.errors import DatasetError
from cluster.storage.errors import StoreUnavailableError, redact_url

log = logging.getLogger(__name__)

REGISTRY_TABLE = "task_registry"
_SCHEMA_LOCK_KEY = 0x7465_7374_6265  # advisory lock id for DDL ("testbe")
_TABLE_NAME = re.compile(r"^ds_[a-z0-9_]{1,40}_[0-9a-f]{10}$")


class RegistryEntry(BaseModel):
    """One loaded task dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_name: str
    table_name: str
    n_docs: int
    splits: dict[str, int]
    sha256: str
    loaded_at: datetime


def dataset_table_name(task_name: str) -> str:
    """A safe, stable table name for a task: ``ds_<slug>_<10 hex of sha256(name)>``.

    The hash keeps names that slug alike (``a-b`` / ``a_b``) apart; the slug keeps the
    table recognisable in ``psql``.
    """
    if not isinstance(task_name, str) or not task_name.strip():
        raise DatasetError(f"invalid task name {task_name!r}: must be a non-empty string")
    if len(task_name) > 256:
        raise DatasetError(f"invalid task name {task_name[:40]!r}...: longer than 256 characters")
    slug = re.sub(r"[^a-z0-9]+", "_", task_name.lower()).strip("_")[:40].strip("_") or "task"
    digest = hashlib.sha256(task_name.encode("utf-8")).hexdigest()[:10]
    name = f"ds_{slug}_{digest}"
    assert _TABLE_NAME.match(name), name
    return name


def _quoted(table: str) -> str:
    if not _TABLE_NAME.match(table):
        raise DatasetError(f"refusing unsafe dataset table name {table!r}")
    return f'"{table}"'


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + _dumps(value).encode("utf-8")  # jsonb binary format: version 1, then text


def _decode_jsonb(data: bytes) -> Any:
    return json.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary format, so that COPY (binary) can encode docs too.
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )


def _check_splits(task_name: str, splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    if not splits:
        raise DatasetError(f"dataset for task {task_name!r} has no splits")
    for split, docs in splits.items():
        if not isinstance(split, str) or not split.strip():
            raise DatasetError(f"dataset for task {task_name!r}: invalid split name {split!r}")
        if not docs:
            raise DatasetError(f"dataset for task {task_name!r}: split {split!r} has no docs")
        for i, doc in enumerate(docs):
            if not isinstance(doc, Mapping):
                raise DatasetError(
                    f"dataset for task {task_name!r}: split {split!r} doc {i} is a "
                    f"{type(doc).__name__}, not an object"
                )


class DatasetStore:
    """Datasets of lm-eval tasks in PostgreSQL. Create with ``await DatasetStore.connect(url)``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        ensure_schema: bool = True,
        timeout_s: float = 30.0,
    ) -> DatasetStore:
        """Open a pool on ``url`` (any asyncpg DSN: TCP or ``?host=/socket/dir``)."""
        try:
            pool = await asyncpg.create_pool(
                url, min_size=min_size, max_size=max_size, init=_init_connection, timeout=timeout_s
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as err:
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL at {redact_url(url)}: {type(err).__name__}: {err}"
            ) from err
        store = cls(pool)
        if ensure_schema:
            try:
                await store.ensure_schema()
            except BaseException:
                await pool.close()
                raise
        log.info("stores.postgres.connected url=%s", redact_url(url))
        return store

    async def close(self) -> None:
        await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def ensure_schema(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await conn.execute(
                f"""
                CREATE TABLE IF NOT EXISTS {REGISTRY_TABLE} (
                    task_name  TEXT PRIMARY KEY,
                    table_name TEXT NOT NULL UNIQUE,
                    n_docs     INTEGER NOT NULL,
                    splits     JSONB NOT NULL,
                    sha256     TEXT NOT NULL,
                    loaded_at  TIMESTAMPTZ NOT NULL DEFAULT now()
                )
                """
            )

    # -- writes ----------------------------------------------------------------------
    async def register_dataset(
        self, task_name: str, splits: Mapping[str, Sequence[Mapping[str, Any]]], sha256: str
    ) -> bool:
        """Load ``splits`` (split → docs) for ``task_name`` unless ``sha256`` is already loaded.

        Returns True when the dataset was (re)loaded, False when it was already there.
        A changed dataset replaces the old one in one transaction.
        """
        table = dataset_table_name(task_name)
        _check_splits(task_name, splits)
        if not isinstance(sha256, str) or not sha256:
            raise DatasetError(f"dataset for task {task_name!r}: sha256 must be a non-empty string")
        counts = {split: len(docs) for split, docs in splits.items()}
        n_docs = sum(counts.values())
        started = time.monotonic()
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # Serialise loads of the same task across processes.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"dataset:{task_name}"
                )
                current = await conn.fetchval(
                    f"SELECT sha256 FROM {REGISTRY_TABLE} WHERE task_name = $1", task_name
                )
                if current == sha256:
                    log.info("stores.postgres.dataset_unchanged task=%s sha256=%s", task_name, sha256[:12])
                    return False
                qt = _quoted(table)
                await conn.execute(f"DROP TABLE IF EXISTS {qt}")
                await conn.execute(
                    f"CREATE TABLE {qt} (__id INTEGER NOT NULL, __split TEXT NOT NULL, doc JSONB NOT NULL)"
                )
                records = [
                    (i, split, dict(doc)) for split, docs in splits.items() for i, doc in enumerate(docs)
                ]
                await conn.copy_records_to_table(table, records=records, columns=["__id", "__split", "doc"])
                await conn.execute(f"ALTER TABLE {qt} ADD PRIMARY KEY (__split, __id)")
                await conn.execute(
                    f"""
                    INSERT INTO {REGISTRY_TABLE} (task_name, table_name, n_docs, splits, sha256, loaded_at)
                    VALUES ($1, $2, $3, $4, $5, now())
                    ON CONFLICT (task_name) DO UPDATE SET
                        table_name = EXCLUDED.table_name, n_docs = EXCLUDED.n_docs,
                        splits = EXCLUDED.splits, sha256 = EXCLUDED.sha256, loaded_at = EXCLUDED.loaded_at
                    """,
                    task_name, table, n_docs, counts, sha256,
                )
        except (ValueError, TypeError) as err:  # not JSON-serialisable (NaN, objects, ...)
            raise DatasetError(f"dataset for task {task_name!r} has a doc that is not valid JSON: {err}") from err
        except asyncpg.PostgresError as err:
            raise DatasetError(
                f"loading the dataset for task {task_name!r} into PostgreSQL failed "
                f"(nothing was changed): {type(err).__name__}: {err}"
            ) from err
        log.info(
            "stores.postgres.dataset_loaded task=%s table=%s docs=%d splits=%s replaced=%s seconds=%.2f",
            task_name, table, n_docs, counts, current is not None, time.monotonic() - started,
        )
        return True

    async def drop_dataset(self, task_name: str) -> bool:
        """Remove a task's dataset and registry row; False when it was not loaded."""
        table = dataset_table_name(task_name)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"DROP TABLE IF EXISTS {_quoted(table)}")
            status: str = await conn.execute(f"DELETE FROM {REGISTRY_TABLE} WHERE task_name = $1", task_name)
        return status == "DELETE 1"

    # -- registry --------------------------------------------------------------------
    async def get_registry(self, task_name: str) -> RegistryEntry | None:
        row = await self._pool.fetchrow(f"SELECT * FROM {REGISTRY_TABLE} WHERE task_name = $1", task_name)
        return RegistryEntry(**dict(row)) if row is not None else None

    async def list_registry(self) -> builtins.list[RegistryEntry]:
        rows = await self._pool.fetch(f"SELECT * FROM {REGISTRY_TABLE} ORDER BY task_name")
        return [RegistryEntry(**dict(row)) for row in rows]

    # -- docs ------------------------------------------------------------------------
    async def _fetch(self, task_name: str, sql: str, *args: Any) -> builtins.list[asyncpg.Record]:
        try:
            rows: builtins.list[asyncpg.Record] = await self._pool.fetch(sql, *args)
        except asyncpg.UndefinedTableError as err:
            raise DatasetError(
                f"task {task_name!r} has no dataset loaded: run `testbench datasets load`"
            ) from err
        return rows

    def _table(self, task_name: str) -> str:
        return _quoted(dataset_table_name(task_name))

    async def count_docs(self, task_name: str, split: str) -> int:
        rows = await self._fetch(
            task_name, f"SELECT count(*) AS n FROM {self._table(task_name)} WHERE __split = $1", split
        )
        return int(rows[0]["n"])

    async def doc_ids(self, task_name: str, split: str) -> builtins.list[int]:
        rows = await self._fetch(
            task_name, f"SELECT __id FROM {self._table(task_name)} WHERE __split = $1 ORDER BY __id", split
        )
        return [int(r["__id"]) for r in rows]

    async def fetch_docs(self, task_name: str, split: str, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Docs by id; a DatasetError names the ids that do not exist."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return {}
        rows = await self._fetch(
            task_name,
            f"SELECT __id, doc FROM {self._table(task_name)} WHERE __split = $1 AND __id = ANY($2::int[])",
            split, wanted,
        )
        docs = {int(r["__id"]): r["doc"] for r in rows}
        if len(docs) != len(wanted):
            missing = [i for i in wanted if i not in docs]
            raise DatasetError(
                f"task {task_name!r} split {split!r} has no docs with ids {missing[:10]}"
                + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            )
        return docs

    async def fetch_split(self, task_name: str, split: str) -> builtins.list[dict[str, Any]]:
        """All docs of a split, ordered by id (so index == doc id)."""
        rows = await self._fetch(
            task_name, f"SELECT doc FROM {self._table(task_name)} WHERE __split = $1 ORDER BY __id", split
        )
        return [r["doc"] for r in rows]
