"""Task sources built in tests from the shipped OpenBookQA rows (nothing from a hub).

- :func:`write_hub_openbookqa`: an offline data directory holding ``allenai/openbookqa``
  config ``main`` in the hub's layout and schema (``main/test-00000-of-00001.parquet``;
  ``id``, ``question_stem``, ``choices: {text, label}``, ``answerKey``), which lm-eval's
  built-in ``openbookqa`` YAML reads;
- :func:`write_group_tasks`: a datasets folder with three small tasks on slices of the same
  rows and two groups (``tb_outer`` = ``tb_head`` + the nested group ``tb_inner`` =
  ``tb_mid`` + ``tb_tail``), sizes 30/20/12 so that size weighting matters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.core.settings import PROJECT_ROOT

ROWS = PROJECT_ROOT / "datasets" / "openbookqa" / "test.jsonl"
GROUP = "tb_outer"
INNER = "tb_inner"
SLICES = {"tb_head": (0, 30), "tb_mid": (30, 50), "tb_tail": (50, 62)}

# lm-eval 0.4.13's openbookqa.yaml fields, reading a local slice
_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
output_type: multiple_choice
test_split: test
doc_to_text: question_stem
doc_to_target: "{{{{choices.label.index(answerKey.lstrip())}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
_INNER = """group: tb_inner
task: [tb_mid, tb_tail]
aggregate_metric_list:
  - metric: acc
    weight_by_size: false
  - metric: acc_norm
    weight_by_size: true
metadata:
  version: 2.0
"""
_OUTER = """group: tb_outer
task: [tb_head, tb_inner]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
  - metric: acc_norm
    weight_by_size: true
"""


def hub_rows() -> list[dict[str, Any]]:
    """The shipped ARC-style rows in the hub's ``allenai/openbookqa`` (main) schema."""
    out = []
    for line in ROWS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        choices = row["question"]["choices"]
        out.append({"id": row["id"], "question_stem": row["question"]["stem"],
                    "choices": {"text": [c["text"] for c in choices],
                                "label": [c["label"] for c in choices]},
                    "answerKey": row["answerKey"]})
    return out


def write_hub_openbookqa(root: Path) -> Path:
    """``root/allenai/openbookqa/main/test-00000-of-00001.parquet``; returns ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "allenai" / "openbookqa" / "main"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(hub_rows()), folder / "test-00000-of-00001.parquet")
    return root


def write_group_tasks(datasets_dir: Path) -> Path:
    """The three tasks and two groups (module docstring); returns ``datasets_dir``."""
    rows = hub_rows()
    datasets_dir.mkdir(parents=True, exist_ok=True)
    for name, (start, stop) in SLICES.items():
        folder = datasets_dir / name
        folder.mkdir(exist_ok=True)
        data = folder / "test.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[start:stop]))
        # absolute data_files: lm-eval's own run reads the same YAML from any directory
        (folder / f"{name}.yaml").write_text(_TASK.format(name=name, file=data))
    (datasets_dir / "tb_inner.yaml").write_text(_INNER)
    (datasets_dir / "tb_outer.yaml").write_text(_OUTER)
    return datasets_dir
