"""Paired estimates (cluster/core/paired.py): the reference's full-task score plus the mean
per-doc difference, with the stderr of the differences."""

from __future__ import annotations

import math
import random

import pytest

from cluster.core.errors import ErrorCode
from cluster.core.paired import (
    ReferenceDoc,
    ReferenceSet,
    counted_values,
    docs_for_half_width,
    mean_stderr,
    paired_score,
    paired_scores,
    reference_set_id,
)

METRIC = "acc,none"


def _set(full: float, *, complete: bool = True, stale: bool = False) -> ReferenceSet:
    return ReferenceSet(set_id="m|t|x", model="m", task="t", task_sha256="s", reference_id="r",
                        output_type="multiple_choice", n_docs=100, docs_done=100,
                        complete=complete, stale=stale, full={METRIC: full},
                        mean_metrics=[METRIC], started_at=0.0, updated_at=0.0)


def _docs(values: dict[int, float]) -> dict[int, ReferenceDoc]:
    return {d: ReferenceDoc(set_id="m|t|x", doc_id=d, metrics={METRIC: v})
            for d, v in values.items()}


def _row(doc: int, value: float, code: ErrorCode = ErrorCode.OK, at: float = 1.0) -> dict:
    return {"doc_id": doc, "error_code": int(code), "metrics": {METRIC: value},
            "created_at": at}


def test_an_honest_node_gets_the_full_task_score_with_zero_stderr_after_a_few_docs() -> None:
    reference = {d: float(d % 3 == 0) for d in range(100)}
    full = sum(reference.values()) / 100
    node = {d: reference[d] for d in (5, 17, 42)}  # a raw mean of 1/3 ± 0.33
    score = paired_score(node, reference, full)
    assert score is not None
    assert score.mean == pytest.approx(full) and score.stderr == 0.0
    assert score.n == 3 and score.differing_docs == 0 and score.mean_diff == 0.0
    raw_mean, raw_stderr = mean_stderr(list(node.values()))
    assert raw_stderr is not None and raw_stderr > 0.3


def test_a_deviating_node_shows_its_differences_with_their_stderr() -> None:
    reference = dict.fromkeys(range(10), 1.0)
    node = {d: (0.0 if d < 4 else 1.0) for d in range(10)}  # wrong on 4 docs
    score = paired_score(node, reference, 0.8)
    assert score is not None
    assert score.mean_diff == pytest.approx(-0.4) and score.mean == pytest.approx(0.4)
    assert score.differing_docs == 4
    assert score.stderr == pytest.approx(math.sqrt(0.4 * 0.6 * 10 / 9 / 10))


def test_docs_the_reference_lacks_are_not_paired_and_nothing_in_common_is_none() -> None:
    assert paired_score({1: 1.0}, {2: 1.0}, 0.5) is None
    score = paired_score({1: 1.0, 2: 0.0, 3: 1.0}, {1: 1.0, 2: 0.0}, 0.5)
    assert score is not None and score.n == 2 and score.stderr == 0.0


def test_counted_values_score_node_failures_as_zero_and_keep_each_docs_newest_sample() -> None:
    rows = [_row(1, 1.0, at=1.0), _row(1, 0.0, at=5.0), _row(2, 1.0, ErrorCode.NODE),
            _row(3, 1.0, ErrorCode.RELAY), _row(4, 1.0, ErrorCode.EVALUATION)]
    assert counted_values(rows, METRIC) == {1: 0.0, 2: 0.0, 4: 0.0}


def test_paired_scores_need_a_complete_current_set() -> None:
    docs = _docs({1: 1.0, 2: 0.0})
    rows = [_row(1, 1.0), _row(2, 0.0)]
    assert paired_scores(rows, _set(0.3), docs)[METRIC].mean == pytest.approx(0.3)
    assert paired_scores(rows, _set(0.3, complete=False), docs) == {}
    assert paired_scores(rows, _set(0.3, stale=True), docs) == {}


def test_paired_stderr_is_the_paired_difference_stderr_and_covers_the_truth() -> None:
    """A node that flips 10% of an otherwise honest task: over many random draws of 40 docs,
    the 95% interval of the paired estimate covers the node's full-task score about 95% of
    the time, and is much narrower than the raw mean's."""
    rng = random.Random(7)
    reference = {d: float(rng.random() < 0.3) for d in range(500)}
    node = {d: (1.0 - v if rng.random() < 0.1 else v) for d, v in reference.items()}
    full_ref = sum(reference.values()) / 500
    full_node = sum(node.values()) / 500
    covered, paired_widths, raw_widths = 0, [], []
    for _ in range(400):
        docs = rng.sample(range(500), 40)
        score = paired_score({d: node[d] for d in docs}, reference, full_ref)
        assert score is not None and score.stderr is not None
        covered += abs(score.mean - full_node) <= 1.96 * score.stderr + 1e-12
        paired_widths.append(score.stderr)
        raw_widths.append(mean_stderr([node[d] for d in docs])[1] or 0.0)
    assert 0.88 <= covered / 400 <= 0.99
    assert sum(paired_widths) < 0.75 * sum(raw_widths)


def test_docs_for_half_width() -> None:
    assert docs_for_half_width(0.4, 0.02) == math.ceil((1.959964 * 0.4 / 0.02) ** 2)
    assert docs_for_half_width(0.0, 0.02) == 2


def test_reference_set_ids_change_with_content_reference_and_prompting() -> None:
    base = reference_set_id("m", "t", "sha1", "ref1")
    assert base.startswith("m|t|")
    assert len({base, reference_set_id("m", "t", "sha2", "ref1"),
                reference_set_id("m", "t", "sha1", "ref2"),
                reference_set_id("m", "t", "sha1", "ref1", "chat")}) == 4
