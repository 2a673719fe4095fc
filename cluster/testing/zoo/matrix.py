"""The detection matrix's judge: what each node of a verification round must measure, given
the role it plays, as a list of the expectations it violated (empty: as calibrated).

Roles are zoo kinds (``honest``, ``perturbed``, ``quantized``, ``bf16``, ``proxy``, ``lazy``,
``random``); any node can be given any role, e.g. a real vLLM node the role ``honest``, or
the int8 cheater the role ``honest`` to show that the judge then fails. Expectations are on
the measured statistics of the verdicts' evidence, not only on the outcomes:

- ``honest``: every check passes; mean |node logprob - reference logprob| on the canaries
  at most ``HONEST_DIFF_SHARE`` of ``max_mean_abs_logprob_diff`` and no single token past
  the threshold; mean regret at most ``HONEST_REGRET_SHARE`` of ``max_mean_regret``; node-
  and reference-greedy shares at their minimums or above; every synthetic answer agrees;
  identity answers are the reference's (``reference_text_share``) and nobody's duplicate.
- ``bf16``: every check passes (finer than the threshold on purpose: see the Calibration
  section of cluster/honesty/README.md).
- ``perturbed``, ``quantized``: the substitution check fails with a mean |Δ logprob| of at
  least ``CHEATER_DIFF_FACTOR[kind]`` times the threshold (2x; int8 1.5x).
- ``lazy``, ``random``: as above, and the synthetic check fails; they have no signature
  routes, so their signature checks are unknown (never fail, never pass).
- ``proxy``: the identity check fails, naming an ``honest`` node as the one it duplicates,
  with text and trace shares at ``identity_match_share`` or above.
- ``probe_aware``, ``temperature_aware``: as ``honest`` on the temperature-0 checks (they
  answer probes with the claimed model: those alone cannot catch them).
- ``temperature_aware`` (registered with ``seeded_sampling``): the seeded-sampling check
  fails, with at least ``CHEATER_MISMATCH_SHARE`` of its replayed tokens not the
  reference's pick (its cheaper model samples above temperature 0).
- any node of an honest role that was asked a seeded sampled request: the check passes with
  at most ``HONEST_DIFF_SHARE`` of ``sampled_max_mismatch_share`` of its tokens differing.
- ``launderer``: the substitution check fails on the node's *tokens* (mean regret at least
  ``CHEATER_DIFF_FACTOR`` times ``max_mean_regret``) while its reported logprobs pass the
  logprob comparison (mean |Δ logprob| within the honest bound: laundered), and the
  synthetic check fails.
- ``sometimes``: no unknown check (whether a round catches it depends on its draws).

No node other than ``lazy`` and ``random`` may have an unknown check.

:func:`judge_traffic` does the same for the traffic check (``traffic_substitution``, one
verdict per node per round of measuring traffic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.core.settings import HonestySettings
from cluster.honesty.verdicts import (
    CHECK_CONFIG,
    CHECK_IDENTITY,
    CHECK_SEEDED,
    CHECK_SUBSTITUTION,
    CHECK_SYNTHETIC,
    CHECK_TOKENIZER,
    CHECKS,
    ROUND_CHECKS,
    Outcome,
    Verdict,
)
from cluster.honesty.verification import RoundReport

HONEST_DIFF_SHARE = 1 / 3
HONEST_REGRET_SHARE = 1 / 3
# int8 re-quantization sits closest to the threshold (its best rounds 1.9x), so its floor
# is 1.5x; the other cheaters are an order of magnitude or more above it.
CHEATER_DIFF_FACTOR: dict[str, float] = {
    "perturbed": 2.0, "quantized": 1.5, "lazy": 2.0, "random": 2.0}
# the cheaper model (half the layers) picks another token than the claimed model's at most
# sampled positions (~90%); half of them is a floor with room to spare
CHEATER_MISMATCH_SHARE = 0.5
# cheaters that answer probes with the claimed model (cluster/testing/zoo/cheaters.py)
PROBE_HONEST_ROLES = ("probe_aware", "temperature_aware")
ROLES: tuple[str, ...] = ("honest", "bf16", "perturbed", "quantized", "proxy", "lazy", "random",
                          "launderer", "sometimes", *PROBE_HONEST_ROLES)
SIGNATURE_CHECKS = (CHECK_TOKENIZER, CHECK_CONFIG)
NO_MODEL_ROLES = ("lazy", "random")

# (check, evidence key) of every statistic the matrix reads, in the order tables show them
STATS: tuple[tuple[str, str], ...] = (
    (CHECK_SUBSTITUTION, "mean_abs_logprob_diff"),
    (CHECK_SUBSTITUTION, "max_abs_logprob_diff"),
    (CHECK_SUBSTITUTION, "mean_regret"),
    (CHECK_SUBSTITUTION, "node_agreement"),
    (CHECK_SUBSTITUTION, "reference_agreement"),
    (CHECK_SYNTHETIC, "agree_share"),
    (CHECK_SYNTHETIC, "exact"),
    (CHECK_IDENTITY, "reference_text_share"),
    (CHECK_IDENTITY, "text_share"),
    (CHECK_IDENTITY, "trace_share"),
    (CHECK_SEEDED, "mismatch_share"),
)


@dataclass(frozen=True)
class Violation:
    """One expectation a node did not meet in one round."""

    seed: int
    node_id: str
    role: str
    what: str

    def __str__(self) -> str:
        return f"seed {self.seed} {self.node_id} (as {self.role}): {self.what}"


@dataclass(frozen=True)
class NodeRound:
    """One node's verdicts in one round, keyed by check."""

    node_id: str
    seed: int
    verdicts: dict[str, Verdict]

    @classmethod
    def of(cls, report: RoundReport, node_id: str) -> NodeRound:
        return cls(node_id, report.seed,
                   {v.check: v for v in report.verdicts if v.node_id == node_id})

    def outcome(self, check: str) -> Outcome | None:
        verdict = self.verdicts.get(check)
        return verdict.outcome if verdict is not None else None

    def evidence(self, check: str) -> dict[str, Any]:
        verdict = self.verdicts.get(check)
        return verdict.evidence if verdict is not None else {}

    def stat(self, check: str, key: str) -> float | None:
        value = self.evidence(check).get(key)
        return float(value) if isinstance(value, int | float) else None


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3g}"


class _Judge:
    def __init__(self, node: NodeRound, role: str, roles: Mapping[str, str],
                 settings: HonestySettings) -> None:
        self.node = node
        self.role = role
        self.roles = roles
        self.s = settings
        self.found: list[Violation] = []

    def fail(self, what: str) -> None:
        self.found.append(Violation(self.node.seed, self.node.node_id, self.role, what))

    def outcome_is(self, check: str, want: Outcome) -> None:
        got = self.node.outcome(check)
        if got is not want:
            reason = self.node.verdicts[check].reason if check in self.node.verdicts else ""
            self.fail(f"{check} is {got.value if got else 'missing'}, expected {want.value}"
                      + (f" ({reason})" if reason else ""))

    def at_most(self, check: str, key: str, bound: float, label: str) -> None:
        value = self.node.stat(check, key)
        if value is None or value > bound:
            self.fail(f"{key} {_fmt(value)} > {label} {bound:.3g}")

    def at_least(self, check: str, key: str, bound: float, label: str) -> None:
        value = self.node.stat(check, key)
        if value is None or value < bound:
            self.fail(f"{key} {_fmt(value)} < {label} {bound:.3g}")

    def run(self) -> list[Violation]:
        s, node = self.s, self.node
        missing = [c for c in CHECKS if c not in node.verdicts]
        if missing:
            self.fail(f"no verdict for {missing}")
            return self.found
        unknown = [c for c in CHECKS if node.outcome(c) is Outcome.UNKNOWN]
        allowed_unknown = SIGNATURE_CHECKS if self.role in NO_MODEL_ROLES else ()
        if set(unknown) - set(allowed_unknown):
            self.fail(f"unknown checks {unknown}")
        threshold = s.max_mean_abs_logprob_diff
        if self.role in ("honest", "bf16", *PROBE_HONEST_ROLES):
            for check in CHECKS:
                self.outcome_is(check, Outcome.PASS)
        if self.role == "launderer":
            self.outcome_is(CHECK_SUBSTITUTION, Outcome.FAIL)
            self.outcome_is(CHECK_SYNTHETIC, Outcome.FAIL)
            self.at_least(CHECK_SUBSTITUTION, "mean_regret", s.max_mean_regret * 2,
                          "cheater bound (2x threshold)")
            self.at_most(CHECK_SUBSTITUTION, "mean_abs_logprob_diff",
                         threshold * HONEST_DIFF_SHARE, "laundered: honest bound")
        if self.role in ("honest", *PROBE_HONEST_ROLES):
            self.at_most(CHECK_SUBSTITUTION, "mean_abs_logprob_diff",
                         threshold * HONEST_DIFF_SHARE, "honest bound (threshold/3)")
            self.at_most(CHECK_SUBSTITUTION, "max_abs_logprob_diff", threshold, "threshold")
            self.at_most(CHECK_SUBSTITUTION, "mean_regret",
                         s.max_mean_regret * HONEST_REGRET_SHARE, "honest bound (threshold/3)")
            self.at_least(CHECK_SUBSTITUTION, "node_agreement", s.min_node_agreement,
                          "threshold")
            self.at_least(CHECK_SUBSTITUTION, "reference_agreement",
                          s.min_reference_agreement, "threshold")
            self.at_least(CHECK_SYNTHETIC, "agree_share", 1.0, "every answer")
            self.at_least(CHECK_IDENTITY, "reference_text_share", s.identity_match_share,
                          "threshold")
            duplicate = node.evidence(CHECK_IDENTITY).get("duplicate_of")
            if duplicate is not None:
                self.fail(f"identity names it a duplicate of {duplicate}")
        if self.role in CHEATER_DIFF_FACTOR:
            factor = CHEATER_DIFF_FACTOR[self.role]
            self.outcome_is(CHECK_SUBSTITUTION, Outcome.FAIL)
            self.at_least(CHECK_SUBSTITUTION, "mean_abs_logprob_diff", threshold * factor,
                          f"cheater bound ({factor:g}x threshold)")
        if self.role in NO_MODEL_ROLES:
            self.outcome_is(CHECK_SYNTHETIC, Outcome.FAIL)
            for check in SIGNATURE_CHECKS:
                self.outcome_is(check, Outcome.UNKNOWN)
        if self.role == "temperature_aware":
            self.outcome_is(CHECK_SEEDED, Outcome.FAIL)
            self.at_least(CHECK_SEEDED, "mismatch_share", CHEATER_MISMATCH_SHARE,
                          "cheaper-model bound")
        elif CHECK_SEEDED in node.verdicts and self.role in ("honest", "bf16", "probe_aware"):
            self.outcome_is(CHECK_SEEDED, Outcome.PASS)
            self.at_most(CHECK_SEEDED, "mismatch_share",
                         s.sampled_max_mismatch_share * HONEST_DIFF_SHARE,
                         "honest bound (threshold/3)")
        if self.role == "proxy":
            self.outcome_is(CHECK_IDENTITY, Outcome.FAIL)
            duplicate = node.evidence(CHECK_IDENTITY).get("duplicate_of")
            if self.roles.get(str(duplicate)) != "honest":
                self.fail(f"duplicate_of {duplicate!r} is not an honest node")
            for key in ("text_share", "trace_share"):
                self.at_least(CHECK_IDENTITY, key, s.identity_match_share, "threshold")
        return self.found


def judge_round(report: RoundReport, roles: Mapping[str, str], settings: HonestySettings
                ) -> list[Violation]:
    """Violations of one round by the nodes in ``roles`` (node id -> role); nodes of the
    round not in ``roles`` are not judged."""
    unknown_roles = sorted(set(roles.values()) - set(ROLES))
    if unknown_roles:
        raise ValueError(f"unknown roles {unknown_roles}; one of {ROLES}")
    found: list[Violation] = []
    for node_id, role in roles.items():
        found += _Judge(NodeRound.of(report, node_id), role, roles, settings).run()
    return found


def judge_matrix(reports: Sequence[RoundReport], roles: Mapping[str, str],
                 settings: HonestySettings) -> list[Violation]:
    """Violations over every round, in round order."""
    return [v for report in reports for v in judge_round(report, roles, settings)]


def stat_ranges(reports: Sequence[RoundReport], node_ids: Sequence[str]
                ) -> dict[str, dict[str, tuple[float, float]]]:
    """Per node, per statistic of :data:`STATS`: (min, max) over the rounds that have it."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for node_id in node_ids:
        rows = [NodeRound.of(r, node_id) for r in reports]
        ranges: dict[str, tuple[float, float]] = {}
        for check, key in STATS:
            values = [v for row in rows if (v := row.stat(check, key)) is not None]
            if values:
                ranges[key] = (min(values), max(values))
        out[node_id] = ranges
    return out


def flag_counts(reports: Sequence[RoundReport], node_id: str) -> dict[str, int]:
    """Rounds in which each check flagged ``node_id``."""
    counts = dict.fromkeys(ROUND_CHECKS, 0)
    for report in reports:
        for verdict in report.verdicts:
            if verdict.node_id == node_id and verdict.flagged:
                counts[verdict.check] += 1
    return counts


def format_ranges(reports: Sequence[RoundReport], roles: Mapping[str, str]) -> str:
    """A text table: per node, its role, each statistic's range over the rounds and the
    rounds each check flagged it (what a failing matrix prints)."""
    ranges = stat_ranges(reports, list(roles))
    keys = [key for _, key in STATS]
    header = ["node (role)", *keys, "flagged"]
    lines = []
    for node_id, role in roles.items():
        row = ranges[node_id]
        cells = [f"{node_id} ({role})"]
        for key in keys:
            lo_hi = row.get(key)
            cells.append("-" if lo_hi is None else _fmt(lo_hi[0]) if lo_hi[0] == lo_hi[1]
                         else f"{_fmt(lo_hi[0])}..{_fmt(lo_hi[1])}")
        flags = flag_counts(reports, node_id)
        cells.append(",".join(f"{c}:{n}" for c, n in flags.items() if n) or "none")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
                     for cells in [header, *lines]) + f"\n({len(reports)} rounds)"


# -- the traffic check (cluster/honesty/measuring.py) --------------------------------------

# role -> what its traffic verdict must show; roles not listed are not judged on traffic
TRAFFIC_HONEST_ROLES = ("honest", "temperature_aware")  # all measuring traffic is at T=0
TRAFFIC_CHEATER_ROLES = ("quantized", "launderer", "probe_aware", "sometimes")


@dataclass(frozen=True)
class TrafficVerdict:
    """One node's traffic verdict in one seeded round of measuring traffic."""

    seed: int
    node_id: str
    outcome: Outcome
    reason: str
    evidence: dict[str, Any]

    def stat(self, key: str) -> float | None:
        value = self.evidence.get(key)
        return float(value) if isinstance(value, int | float) else None


def judge_traffic(verdicts: Sequence[TrafficVerdict], roles: Mapping[str, str],
                  settings: HonestySettings) -> list[Violation]:
    """Expectations on the traffic check's statistics, by role:

    - ``honest``, ``temperature_aware`` (measuring traffic is temperature 0): pass; mean
      |Δ loglikelihood| per token and re-scored mean |Δ logprob| at most a third of
      ``max_mean_abs_logprob_diff``; no outlier request, no parted generation;
    - ``quantized``: fail, mean |Δ loglikelihood| at least 1.5x the threshold;
    - ``launderer``: fail on generations (at least half part from the reference's greedy
      answers) while its loglikelihoods are within the honest bound (laundered);
    - ``probe_aware``: fail, mean |Δ loglikelihood| at least 2x the threshold;
    - ``sometimes``: fail with at least one outlier request;

    and for every node the validator's re-scoring within ``rescore_share``.
    """
    thr = settings.max_mean_abs_logprob_diff
    honest_bound = thr * HONEST_DIFF_SHARE
    found: list[Violation] = []
    for v in verdicts:
        role = roles.get(v.node_id)
        if role is None:
            continue

        def fail(what: str, v: TrafficVerdict = v, role: str = role) -> None:
            found.append(Violation(v.seed, v.node_id, role, f"traffic: {what}"))

        def at_most(key: str, bound: float, label: str, v: TrafficVerdict = v) -> None:
            value = v.stat(key)
            if value is not None and value > bound:
                fail(f"{key} {_fmt(value)} > {label} {bound:.3g}")

        def at_least(key: str, bound: float, label: str, v: TrafficVerdict = v) -> None:
            value = v.stat(key)
            if value is None or value < bound:
                fail(f"{key} {_fmt(value)} < {label} {bound:.3g}")

        want = (Outcome.PASS if role in TRAFFIC_HONEST_ROLES
                else Outcome.FAIL if role in TRAFFIC_CHEATER_ROLES else None)
        if want is not None and v.outcome is not want:
            fail(f"outcome {v.outcome.value}, expected {want.value} ({v.reason[:200]})")
        share = v.stat("validator_share")
        if share is not None and share > settings.rescore_share + 1e-9:
            fail(f"validator_share {share:.3g} > rescore_share {settings.rescore_share}")
        if role in TRAFFIC_HONEST_ROLES:
            at_most("mean_abs_ll_diff", honest_bound, "honest bound (threshold/3)")
            at_most("rescored_mean_abs_diff", honest_bound, "honest bound (threshold/3)")
            at_most("generation_mean_abs_logprob_diff", honest_bound,
                    "honest bound (threshold/3)")
            at_most("outlier_requests", 0, "none allowed")
            at_most("rescored_outliers", 0, "none allowed")
            at_most("parted_generations", 0, "none allowed")
        elif role == "quantized":
            at_least("mean_abs_ll_diff", thr * CHEATER_DIFF_FACTOR["quantized"],
                     "cheater bound (1.5x threshold)")
        elif role == "launderer":
            at_least("parted_share", 0.5, "half of its generations")
            at_most("mean_abs_ll_diff", honest_bound, "laundered: honest bound")
        elif role == "probe_aware":
            at_least("mean_abs_ll_diff", thr * 2, "cheater bound (2x threshold)")
        elif role == "sometimes":
            outliers = (v.stat("outlier_requests") or 0) + (v.stat("rescored_outliers") or 0)
            if outliers < 1:
                fail("no outlier request")
    return found


TRAFFIC_STATS = ("mean_abs_ll_diff", "max_abs_ll_diff", "outlier_requests", "parted_share",
                 "generation_mean_abs_logprob_diff", "rescored_relays",
                 "rescored_mean_abs_diff", "rescored_outliers", "validator_share")


def format_traffic_ranges(verdicts: Sequence[TrafficVerdict], roles: Mapping[str, str]) -> str:
    """Per node: each traffic statistic's range over the rounds and the rounds it failed."""
    header = ["node (role)", *TRAFFIC_STATS, "failed"]
    lines = []
    for node_id, role in roles.items():
        mine = [v for v in verdicts if v.node_id == node_id]
        if not mine:
            continue
        cells = [f"{node_id} ({role})"]
        for key in TRAFFIC_STATS:
            values = [x for v in mine if (x := v.stat(key)) is not None]
            cells.append("-" if not values else _fmt(values[0]) if min(values) == max(values)
                         else f"{_fmt(min(values))}..{_fmt(max(values))}")
        cells.append(f"{sum(v.outcome is Outcome.FAIL for v in mine)}/{len(mine)}")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
                     for cells in [header, *lines])
