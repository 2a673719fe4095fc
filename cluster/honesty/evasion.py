"""Evasion: a node that keeps leaving verification probes unanswered while it answers its
measuring traffic.

Such a node would otherwise stay merely *unverified* (its checks unknown: "did not
answer") for as long as it likes, serving measuring and organic traffic all the while.
After each round, every node whose probes went out is judged from its last
``evasion_rounds`` rounds (the ``probes`` evidence every round verdict carries) and its
measuring relays since the first of them:

| probes of the last rounds | measuring relays since | verdict |
|---|---|---|
| answered in the latest round | any | pass |
| unanswered, fewer than ``evasion_rounds`` rounds in a row | any | unknown |
| unanswered ``evasion_rounds`` rounds in a row | ≥ ``evasion_min_relays``, ≥ ``evasion_min_ok_share`` ok | **fail** (evading) |
| unanswered ``evasion_rounds`` rounds in a row | fewer (nothing to compare with), or mostly failing (down, not evasive) | unknown |

"Unanswered" is a connection error, a timeout or an HTTP error on the round's generation
request; a node without ``/v1/completions`` (chat only) is not probed and not judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cluster.core.settings import HonestySettings
from cluster.core.verdicts import Check, Outcome, VerdictRecord
from cluster.honesty.verdicts import CHECK_IDENTITY, PROBES_KEY, Verdict
from cluster.storage.mongo import MongoStores

ProbeState = Literal["answered", "unanswered", "malformed", "unsupported", "not_sent"]
CHECK_EVASION = Check.EVASION


@dataclass(frozen=True)
class EvasionJudgement:
    outcome: Outcome
    reason: str
    evidence: dict[str, Any]


def judge_evasion(settings: HonestySettings, states: Sequence[str], measuring_relays: int,
                  measuring_ok: int) -> EvasionJudgement:
    """``states``: the probe states of the node's last rounds, oldest first (the newest is
    the round just made); measuring relays (and ok ones) since the first of the last
    ``evasion_rounds`` rounds."""
    k = settings.evasion_rounds
    streak = 0
    for state in reversed(states):
        if state != "unanswered":
            break
        streak += 1
    evidence: dict[str, Any] = {"unanswered_rounds": streak, "rounds_to_flag": k,
                                "measuring_relays": measuring_relays,
                                "measuring_ok": measuring_ok}
    if streak == 0:
        return EvasionJudgement(Outcome.PASS, "answered the round's probes", evidence)
    if streak < k:
        return EvasionJudgement(
            Outcome.UNKNOWN, f"unknown: probes unanswered in the last {streak} round(s) "
            f"(evading after {k})", evidence)
    share = measuring_ok / measuring_relays if measuring_relays else 0.0
    evidence["measuring_ok_share"] = round(share, 4)
    if measuring_relays >= settings.evasion_min_relays and share >= settings.evasion_min_ok_share:
        return EvasionJudgement(
            Outcome.FAIL, f"evading: probes unanswered in {streak} consecutive rounds while "
            f"{measuring_ok} of {measuring_relays} measuring requests were answered", evidence)
    if measuring_relays < settings.evasion_min_relays:
        return EvasionJudgement(
            Outcome.UNKNOWN, f"unknown: probes unanswered in {streak} rounds, and only "
            f"{measuring_relays} measuring requests since to compare with", evidence)
    return EvasionJudgement(
        Outcome.UNKNOWN, f"unknown: probes unanswered in {streak} rounds, and only "
        f"{measuring_ok} of {measuring_relays} measuring requests answered: down, not evading",
        evidence)


async def judge_round_evasion(settings: HonestySettings, stores: MongoStores,
                              verdicts: Sequence[Verdict], ts: float) -> list[VerdictRecord]:
    """An evasion verdict for every node whose probes a just-recorded round sent."""
    out: list[VerdictRecord] = []
    k = settings.evasion_rounds
    for verdict in verdicts:
        if verdict.check != CHECK_IDENTITY:
            continue
        state = verdict.evidence.get(PROBES_KEY)
        if state not in ("answered", "unanswered", "malformed"):
            continue  # not probed (chat only, no reference): nothing to judge
        node = verdict.node_id
        round_id = f"{verdict.evidence.get('model')}:{verdict.evidence.get('seed')}"
        states = [state]
        relays = ok = 0
        if state == "unanswered":
            history = [(r.ts, str(r.evidence.get(PROBES_KEY, "not_sent")))
                       for r in await stores.verdicts.for_node(node, CHECK_IDENTITY)
                       if r.evidence.get("round") != round_id]
            rounds = [*history, (ts, state)][-k:]
            states = [s for _, s in rounds]
            if len(states) >= k and all(s == "unanswered" for s in states):
                relays, ok = await stores.relays.answered_since(node, rounds[0][0])
        judgement = judge_evasion(settings, states, relays, ok)
        out.append(VerdictRecord(
            verdict_id=f"{CHECK_EVASION}|{node}|{round_id}", node_id=node, check=CHECK_EVASION,
            outcome=judgement.outcome, reason=judgement.reason,
            evidence={**judgement.evidence, "round": round_id}, ts=ts))
    return out
