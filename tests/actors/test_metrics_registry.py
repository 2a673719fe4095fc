"""The metrics helpers without Ray: no-ops that never import Ray, and sticky gauges."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from actors import metrics
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Relay


class FakeGauge:
    def __init__(self) -> None:
        self.values: list[float | None] = []

    def set(self, value: float | None, tags: dict[str, str] | None = None) -> None:
        self.values.append(value)


def test_recording_without_ray_is_a_no_op_and_does_not_import_ray() -> None:
    code = """
import sys
from actors import metrics
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Relay
relay = Relay(prompt_id="n|t|0|0|0", sample_key="n|t|0|0", node_id="n", task="t", doc_id=0,
              request_index=0, error_code=ErrorCode.OK, started_at=0.0, finished_at=1.0)
metrics.record_relays([relay])
metrics.set_requester_queue(1, 1)
metrics.set_manager_queue(3, planned=2, redriven=0)
metrics.record_verdict("identity", "pass")
assert metrics.loop_metrics() is None
assert "ray" not in sys.modules, "recording imported ray"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_no_metrics_object_while_ray_is_not_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_metrics", None)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if never imported
    metrics.record_relays([Relay(
        prompt_id="n|t|0|0|0", sample_key="n|t|0|0", node_id="n", task="t", doc_id=0,
        request_index=0, error_code=ErrorCode.NODE, started_at=0.0, finished_at=1.0)])
    assert metrics.loop_metrics() is None


def test_a_sticky_gauge_sets_its_last_value_again() -> None:
    fake = FakeGauge()
    gauge = metrics.StickyGauge(fake)
    gauge.refresh()  # nothing set yet: nothing to repeat
    gauge.set(4)
    gauge.set(2)
    gauge.refresh()
    assert fake.values == [4, 2, 2]


def test_error_code_labels_are_lower_case_names() -> None:
    assert metrics.code_label(ErrorCode.OK) == "ok"
    assert metrics.code_label(2) == "node"


class FakeCounter:
    def __init__(self) -> None:
        self.counts: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        key = tuple(sorted((tags or {}).items()))
        self.counts[key] = self.counts.get(key, 0) + value


async def test_the_auditor_counts_every_verdict_it_writes_by_check_and_outcome(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The production sink of the loop's Auditor (actors/auditor.py) after a known round:
    three nodes' five verdicts and an evasion verdict each, written in one call."""
    from actors.auditor import MeteredVerdicts
    from cluster.core.verdicts import Check, Outcome, VerdictRecord

    class Store:
        written: list[VerdictRecord] = []

        async def record(self, verdicts: Sequence[VerdictRecord]) -> int:
            self.written.extend(verdicts)
            return len(verdicts)

    fake = FakeCounter()
    monkeypatch.setattr(metrics, "_metrics", SimpleNamespace(verdicts=fake))
    outcomes = {  # node -> outcome of its five round checks, then of evasion
        "honest": [Outcome.PASS] * 5 + [Outcome.PASS],
        "cheater": [Outcome.PASS, Outcome.PASS, Outcome.PASS, Outcome.FAIL, Outcome.FAIL,
                    Outcome.PASS],
        "evader": [Outcome.UNKNOWN] * 5 + [Outcome.FAIL],
    }
    checks = [Check.TOKENIZER_SIGNATURE, Check.CONFIG_SIGNATURE, Check.IDENTITY, Check.SYNTHETIC,
              Check.SUBSTITUTION, Check.EVASION]
    records = [VerdictRecord(verdict_id=f"{c}|{node}|m:1", node_id=node, check=c, outcome=o,
                             reason="r", ts=1.0)
               for node, outs in outcomes.items() for c, o in zip(checks, outs, strict=True)]
    store = Store()
    assert await MeteredVerdicts(store).record(records) == 18 and store.written == records
    assert fake.counts == {
        (("check", "tokenizer_signature"), ("outcome", "pass")): 2,
        (("check", "tokenizer_signature"), ("outcome", "unknown")): 1,
        (("check", "config_signature"), ("outcome", "pass")): 2,
        (("check", "config_signature"), ("outcome", "unknown")): 1,
        (("check", "identity"), ("outcome", "pass")): 2,
        (("check", "identity"), ("outcome", "unknown")): 1,
        (("check", "synthetic"), ("outcome", "pass")): 1,
        (("check", "synthetic"), ("outcome", "fail")): 1,
        (("check", "synthetic"), ("outcome", "unknown")): 1,
        (("check", "substitution"), ("outcome", "pass")): 1,
        (("check", "substitution"), ("outcome", "fail")): 1,
        (("check", "substitution"), ("outcome", "unknown")): 1,
        (("check", "evasion"), ("outcome", "pass")): 2,
        (("check", "evasion"), ("outcome", "fail")): 1,
    }
