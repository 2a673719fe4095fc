"""The detection matrix's judge on hand-made rounds: it reads the statistics, not only the
outcomes, and a statistic that was not measured is a violation, never a pass."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.core.settings import HonestySettings
from cluster.honesty.verdicts import CHECKS, Outcome, Verdict
from cluster.honesty.verification import RoundReport
from cluster.testing.zoo.matrix import format_ranges, judge_round

SETTINGS = HonestySettings()
HONEST_EVIDENCE: dict[str, dict[str, Any]] = {
    "substitution": {"mean_abs_logprob_diff": 2e-6, "max_abs_logprob_diff": 1e-5,
                     "mean_regret": 0.0, "node_agreement": 1.0, "reference_agreement": 1.0},
    "synthetic": {"agree_share": 1.0, "exact": 3},
    "identity": {"reference_text_share": 1.0},
}


def node(node_id: str, outcomes: dict[str, Outcome] | None = None,
         **evidence: dict[str, Any]) -> list[Verdict]:
    outcomes = outcomes or {}
    return [Verdict(node_id, check, outcomes.get(check, Outcome.PASS), "",
                    {**HONEST_EVIDENCE.get(check, {}), **evidence.get(check, {})})
            for check in CHECKS]


def round_of(*nodes: list[Verdict], seed: int = 1) -> RoundReport:
    return RoundReport(f"m:{seed}", seed, "m", [v for n in nodes for v in n], 0.0, 1.0)


def test_an_honest_node_with_honest_statistics_has_no_violation() -> None:
    assert judge_round(round_of(node("a")), {"a": "honest"}, SETTINGS) == []


@pytest.mark.parametrize(("check", "key", "value"), [
    ("substitution", "mean_abs_logprob_diff", 0.006),   # passes the check, over threshold/3
    ("substitution", "mean_abs_logprob_diff", None),    # not measured
    ("substitution", "node_agreement", 0.85),
    ("synthetic", "agree_share", 2 / 3),
    ("identity", "reference_text_share", 2 / 3),
])
def test_an_honest_node_is_judged_on_its_statistics(check: str, key: str,
                                                     value: float | None) -> None:
    report = round_of(node("a", **{check: {key: value}}))
    found = judge_round(report, {"a": "honest"}, SETTINGS)
    assert [v.what.split()[0] for v in found] == [key], found


def test_a_cheater_must_be_flagged_and_far_enough_from_the_threshold() -> None:
    fail = {"substitution": Outcome.FAIL}
    far = node("q", fail, substitution={"mean_abs_logprob_diff": 0.03})
    near = node("q", fail, substitution={"mean_abs_logprob_diff": 0.016})
    unflagged = node("q", substitution={"mean_abs_logprob_diff": 0.03})
    assert judge_round(round_of(far), {"q": "quantized"}, SETTINGS) == []
    assert judge_round(round_of(near), {"q": "quantized"}, SETTINGS)[0].what.startswith(
        "mean_abs_logprob_diff 0.016 < cheater bound")
    assert judge_round(round_of(unflagged), {"q": "quantized"}, SETTINGS)[0].what.startswith(
        "substitution is pass, expected fail")


def test_a_proxy_must_be_named_the_duplicate_of_an_honest_node() -> None:
    proxy = node("p", {"identity": Outcome.FAIL},
                 identity={"duplicate_of": "a", "text_share": 1.0, "trace_share": 1.0})
    report = round_of(node("a"), proxy)
    assert judge_round(report, {"a": "honest", "p": "proxy"}, SETTINGS) == []
    found = judge_round(report, {"a": "quantized", "p": "proxy"}, SETTINGS)
    assert any(v.node_id == "p" and "not an honest node" in v.what for v in found), found
    assert "p (proxy)" in format_ranges([report], {"a": "honest", "p": "proxy"})
