"""Parsing and error messages of cluster.tasks.datasets (no database server)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.core.errors import DatasetError
from cluster.tasks.datasets import (
    dataset_sha256,
    load_hub_dataset,
    load_task_datasets,
    load_user_file,
    load_user_files,
    read_rows,
    split_files,
)


@dataclass
class _Entry:
    sha256: str
    splits: dict[str, int]


class FakeRegistry:
    """In-memory stand-in for DatasetStore's register/get (same idempotency contract)."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.docs: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
        self.register_calls = 0

    async def get_registry(self, task_name: str) -> _Entry | None:
        return self.entries.get(task_name)

    async def register_dataset(
        self, task_name: str, splits: Mapping[str, Sequence[Mapping[str, Any]]], sha256: str
    ) -> bool:
        self.register_calls += 1
        current = self.entries.get(task_name)
        if current is not None and current.sha256 == sha256:
            return False
        self.entries[task_name] = _Entry(sha256, {k: len(v) for k, v in splits.items()})
        self.docs[task_name] = {k: list(v) for k, v in splits.items()}
        return True


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- formats -------------------------------------------------------------------------------
def test_jsonl_rows_skip_blank_lines_and_keep_order(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"a": 1}\n\n{"a": 2, "b": [1, {"c": null}]}\n')
    assert read_rows(path) == [{"a": 1}, {"a": 2, "b": [1, {"c": None}]}]


def test_jsonl_malformed_line_names_its_line_number(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DatasetError, match=r"t\.jsonl:3: malformed JSON line"):
        read_rows(path)


def test_jsonl_non_object_row_is_rejected_with_line_number(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DatasetError, match=r"t\.jsonl:2: expected a JSON object per row, got list"):
        read_rows(path)


def test_json_array_and_data_wrapper(tmp_path: Path) -> None:
    assert read_rows(write(tmp_path / "a.json", '[{"x": 1}, {"x": 2}]')) == [{"x": 1}, {"x": 2}]
    assert read_rows(write(tmp_path / "b.json", '{"version": 1, "data": [{"x": 3}]}')) == [{"x": 3}]


def test_json_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"c\.json:2: malformed JSON"):
        read_rows(write(tmp_path / "c.json", '[{"x": 1},\n {"x": }]'))
    with pytest.raises(DatasetError, match=r"expected a JSON object per row, got int"):
        read_rows(write(tmp_path / "d.json", "[1, 2]"))
    with pytest.raises(DatasetError, match=r"expected a JSON array of objects"):
        read_rows(write(tmp_path / "e.json", '{"x": 1}'))


def test_csv_rows_are_strings_keyed_by_header(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", 'question,answer\n"What is 1,2?",3\n\nq2,"multi\nline"\n')
    assert read_rows(path) == [
        {"question": "What is 1,2?", "answer": "3"},
        {"question": "q2", "answer": "multi\nline"},
    ]


def test_inconsistent_csv_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "a,b\n1,2\n3,4,5\n")
    with pytest.raises(DatasetError, match=r"t\.csv:3: inconsistent CSV: 3 fields, the header has 2"):
        read_rows(path)
    with pytest.raises(DatasetError, match=r"repeats columns \['a'\]"):
        read_rows(write(tmp_path / "u.csv", "a,a\n1,2\n"))


def test_parquet_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"q": ["a", "b"], "n": [1, 2], "f": [0.5, float("nan")]}), path)
    assert read_rows(path) == [{"q": "a", "n": 1, "f": 0.5}, {"q": "b", "n": 2, "f": None}]


def test_corrupt_parquet_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a readable parquet file"):
        read_rows(write(tmp_path / "bad.parquet", "not parquet"))


@pytest.mark.parametrize("name", ["t.jsonl", "t.json", "t.csv"])
def test_empty_file_is_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError, match="empty dataset file"):
        read_rows(write(tmp_path / name, "\n\n"))


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing\.jsonl: file not found"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match=r"unknown dataset file extension '\.txt'.*\.jsonl, \.json, \.csv, \.parquet"):
        read_rows(write(tmp_path / "data.txt", "x"))


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_rows(path)


# -- task dirs and hashing -------------------------------------------------------------------
def test_split_files_ignore_non_data_and_reject_two_files_per_split(tmp_path: Path) -> None:
    task = tmp_path / "t"
    write(task / "train.jsonl", "{}\n")
    write(task / "test.csv", "a\n1\n")
    write(task / "t.yaml", "task: t\n")
    write(task / "LICENSE", "MIT\n")
    assert split_files(task) == {"test": task / "test.csv", "train": task / "train.jsonl"}
    write(task / "test.jsonl", "{}\n")
    with pytest.raises(DatasetError, match="split 'test' has two files"):
        split_files(task)


def test_sha256_depends_on_bytes_and_split_names_not_on_order(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", '{"x": 1}\n')
    b = write(tmp_path / "b.jsonl", '{"x": 2}\n')
    assert dataset_sha256({"train": a, "test": b}) == dataset_sha256({"test": b, "train": a})
    assert dataset_sha256({"train": a, "test": b}) != dataset_sha256({"train": b, "test": a})
    before = dataset_sha256({"test": a})
    a.write_text('{"x": 1} \n')
    assert dataset_sha256({"test": a}) != before


async def test_load_task_datasets_is_idempotent_and_reloads_on_change(tmp_path: Path) -> None:
    write(tmp_path / "alpha" / "test.jsonl", '{"q": 1}\n{"q": 2}\n')
    write(tmp_path / "alpha" / "train.jsonl", '{"q": 0}\n')
    write(tmp_path / "beta" / "test.csv", "q\nx\n")
    write(tmp_path / "docs_only" / "README.md", "no data here\n")
    store = FakeRegistry()

    first = await load_task_datasets(store, tmp_path)
    assert [(r.task, r.splits, r.n_docs, r.loaded) for r in first] == [
        ("alpha", {"test": 2, "train": 1}, 3, True),
        ("beta", {"test": 1}, 1, True),
    ]
    assert store.docs["alpha"]["test"] == [{"q": 1}, {"q": 2}]

    again = await load_task_datasets(store, tmp_path)
    assert [(r.task, r.splits, r.loaded) for r in again] == [
        ("alpha", {"test": 2, "train": 1}, False),
        ("beta", {"test": 1}, False),
    ]
    assert store.register_calls == 2  # unchanged files are not even parsed again
    assert [r.sha256 for r in again] == [r.sha256 for r in first]

    write(tmp_path / "alpha" / "test.jsonl", '{"q": 1}\n{"q": 2}\n{"q": 3}\n')
    changed = await load_task_datasets(store, tmp_path, tasks=["alpha"])
    assert [(r.task, r.splits["test"], r.loaded) for r in changed] == [("alpha", 3, True)]


async def test_load_task_datasets_errors(tmp_path: Path) -> None:
    store = FakeRegistry()
    with pytest.raises(DatasetError, match="does not exist"):
        await load_task_datasets(store, tmp_path / "nope")
    with pytest.raises(DatasetError, match="task 'ghost': no dataset dir"):
        await load_task_datasets(store, tmp_path, tasks=["ghost"])
    write(tmp_path / "empty_task" / "empty_task.yaml", "task: x\n")
    with pytest.raises(DatasetError, match="holds no split files"):
        await load_task_datasets(store, tmp_path, tasks=["empty_task"])
    write(tmp_path / "bad" / "test.jsonl", '{"q": 1}\nnot json\n')
    with pytest.raises(DatasetError, match=r"test\.jsonl:2: malformed JSON line"):
        await load_task_datasets(store, tmp_path, tasks=["bad"])
    assert store.entries == {}


async def test_load_user_file_and_files(tmp_path: Path) -> None:
    store = FakeRegistry()
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(5)]
    path = write(tmp_path / "mine.json", json.dumps(rows))
    result = await load_user_file(store, "my_task", path, split="validation")
    assert (result.task, result.splits, result.loaded) == ("my_task", {"validation": 5}, True)
    assert store.docs["my_task"]["validation"] == rows
    assert (await load_user_file(store, "my_task", path, split="validation")).loaded is False

    both = await load_user_files(
        store, "my_task", {"test": path, "train": write(tmp_path / "few.csv", "question,answer\nq,a\n")}
    )
    assert both.splits == {"test": 5, "train": 1}
    with pytest.raises(DatasetError, match="unknown dataset file extension"):
        await load_user_file(store, "my_task", write(tmp_path / "x.xlsx", "x"), split="test")
    with pytest.raises(DatasetError, match="file not found"):
        await load_user_file(store, "my_task", tmp_path / "gone.jsonl", split="test")


async def test_hub_dataset_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match=r"hub dataset 'openai/gsm8k' \(main\) split 'test'.*switched off"):
        await load_hub_dataset(FakeRegistry(), "gsm8k", "openai/gsm8k", "main", "test")


async def test_unreachable_hub_fails_fast_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    with pytest.raises(DatasetError, match=r"hub is offline: hub\.invalid:443 is unreachable"):
        await load_hub_dataset(FakeRegistry(), "gsm8k", "openai/gsm8k", None, "test")
