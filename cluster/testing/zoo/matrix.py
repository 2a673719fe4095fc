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

No node other than ``lazy`` and ``random`` may have an unknown check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.core.settings import HonestySettings
from cluster.honesty.verdicts import (
    CHECK_CONFIG,
    CHECK_IDENTITY,
    CHECK_SUBSTITUTION,
    CHECK_SYNTHETIC,
    CHECK_TOKENIZER,
    CHECKS,
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
ROLES: tuple[str, ...] = ("honest", "bf16", "perturbed", "quantized", "proxy", "lazy", "random")
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
        if self.role in ("honest", "bf16"):
            for check in CHECKS:
                self.outcome_is(check, Outcome.PASS)
        if self.role == "honest":
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
    counts = dict.fromkeys(CHECKS, 0)
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
