"""Identity signatures and the rule that turns coinciding ones into verdicts.

A node's identity signature is, for each seeded temperature-0 identity prompt, the sha256
of its answer text, plus the sha256 of its *trace*: the text together with the logprobs
the node reported for its own tokens, exactly as sent (floats survive JSON unchanged).

**Why two hashes.** The answer text alone cannot tell a proxy from an honest node: greedy
decoding of one model is (nearly) deterministic, so every honest deployment of the claimed
model gives the reference's answers, and a proxy of an honest node gives them too. What a
proxy cannot avoid (short of re-computing, i.e. not being a proxy) is reproducing its
backend's answers *bit for bit*, logprobs included, while independent deployments differ in
the last bits of their logprobs (other hardware, kernels, batch shapes).

**The rule**, applied to every pair of registered nodes claiming the same model:

1. their answers *coincide* when the share of identity prompts with equal text hashes is
   at least ``threshold`` (default 0.9), and, if both nodes answer as the reference (their
   text hashes match the reference's on at least ``threshold`` of the prompts: coincidence
   explained by the model), also the share of equal trace hashes is at least ``threshold``;
2. coinciding pairs are joined into groups (transitively): a group is one backend;
3. in a group, the node registered first (lowest seniority) holds the identity; every
   other member run by a *different operator* is flagged (``duplicate_of`` the holder: it
   serves someone else's backend under its own name, i.e. a proxy or a copy); members of
   the holder's own operator are not flagged (an operator may expose one backend under
   several names; they count as one identity) but the group is in the evidence.

**What it cannot do.** It cannot tell which member of a group is the original: seniority
decides, so a proxy registered *before* its backend's node would be kept and the backend's
node flagged (the evidence names both, with their latencies, for a person to decide). Two
honest nodes on bit-identical stacks (same engine, hardware and batch shapes) coincide
bitwise and the later one is flagged: give them the same operator, or raise the bar. A
proxy that perturbs the logprobs it relays escapes this check (and then reports logprobs
that are not its backend's: the substitution check bounds how far it can go). Nodes that
report no logprobs are compared on text alone: two such honest nodes of one model coincide.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.core.verdicts import Outcome


def answer_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def trace_sha256(text: str, logprobs: Sequence[float | None] | None) -> str:
    """sha256 of the answer and the logprobs reported for it (``repr`` of each float)."""
    values = None if logprobs is None else [None if v is None else repr(float(v)) for v in logprobs]
    payload = json.dumps({"text": text, "logprobs": values}, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class IdentitySignature:
    """One node's identity answers in one round (``None`` where it gave no answer)."""

    node_id: str
    operator: str
    seniority: float  # lower = registered earlier
    text_sha256: tuple[str | None, ...]
    trace_sha256: tuple[str | None, ...]
    latency_s: float | None = None


def match_share(a: Sequence[str | None], b: Sequence[str | None]) -> float:
    """Share of positions where both have a hash and the hashes are equal."""
    if not a or len(a) != len(b):
        return 0.0
    return sum(1 for x, y in zip(a, b, strict=True) if x is not None and x == y) / len(a)


@dataclass(frozen=True)
class PairComparison:
    a: str
    b: str
    text_share: float
    trace_share: float
    reference_like: bool
    coincide: bool


def compare(a: IdentitySignature, b: IdentitySignature,
            reference_text: Sequence[str | None] | None, threshold: float) -> PairComparison:
    text = match_share(a.text_sha256, b.text_sha256)
    trace = match_share(a.trace_sha256, b.trace_sha256)
    reference_like = reference_text is not None and \
        match_share(a.text_sha256, reference_text) >= threshold and \
        match_share(b.text_sha256, reference_text) >= threshold
    coincide = text >= threshold and (not reference_like or trace >= threshold)
    return PairComparison(a.node_id, b.node_id, text, trace, reference_like, coincide)


@dataclass(frozen=True)
class IdentityFinding:
    node_id: str
    outcome: Outcome
    reason: str
    evidence: dict[str, Any]


@dataclass(frozen=True)
class IdentityClaim:
    """A node as the grouping rule sees it: who runs it and its seniority (lower =
    registered earlier; decides who holds a shared identity)."""

    node_id: str
    operator: str
    seniority: float


def _find_root(parent: dict[str, str], x: str) -> str:
    """Union-find: the root of ``x``'s group (with path halving)."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def group_identities(
    claims: Sequence[IdentityClaim],
    coinciding: Iterable[tuple[str, str]],
    member_evidence: Callable[[IdentityClaim], dict[str, Any]],
    compare_with_holder: Callable[[IdentityClaim, IdentityClaim], tuple[str, dict[str, Any]]],
) -> dict[str, IdentityFinding]:
    """Steps 2 and 3 of the rule (module docstring), the one place they are decided: join
    ``coinciding`` pairs of node ids into groups (transitively); in each group the node of
    lowest (seniority, node id) holds the identity and passes, members of the holder's
    operator pass, every other member fails as a proxy or duplicate of the holder.

    How pairs are found to coincide, and the evidence, are the caller's: the verification
    round compares identity probes (:func:`judge_identities`), the measuring loop compares
    signature samples (``cluster.tasks.signature.loop_identity_findings``).
    ``member_evidence(member)`` adds to every member's evidence; ``compare_with_holder(member,
    holder)`` gives, for a member other than the holder, the sentence saying how it
    coincides with the holder and the evidence of that comparison."""
    parent = {c.node_id: c.node_id for c in claims}
    for a, b in coinciding:
        parent[_find_root(parent, a)] = _find_root(parent, b)
    groups: dict[str, list[IdentityClaim]] = {}
    for claim in claims:
        groups.setdefault(_find_root(parent, claim.node_id), []).append(claim)
    findings: dict[str, IdentityFinding] = {}
    for members in groups.values():
        members.sort(key=lambda c: (c.seniority, c.node_id))
        holder = members[0]
        names = [m.node_id for m in members]
        for member in members:
            evidence: dict[str, Any] = {"group": names, "holder": holder.node_id,
                                        "operator": member.operator, **member_evidence(member)}
            if member is holder:
                reason = ("unique identity" if len(members) == 1 else
                          f"holds the identity of group {names} (registered first)")
                findings[member.node_id] = IdentityFinding(member.node_id, Outcome.PASS,
                                                           reason, evidence)
                continue
            detail, compared = compare_with_holder(member, holder)
            evidence.update({"duplicate_of": holder.node_id,
                             "holder_operator": holder.operator, **compared})
            if member.operator == holder.operator:
                findings[member.node_id] = IdentityFinding(
                    member.node_id, Outcome.PASS,
                    f"same backend as {holder.node_id}, same operator: {detail}", evidence)
            else:
                findings[member.node_id] = IdentityFinding(
                    member.node_id, Outcome.FAIL, f"proxy or duplicate: {detail}", evidence)
    return findings


def judge_identities(
    signatures: Sequence[IdentitySignature],
    reference_text: Sequence[str | None] | None,
    threshold: float,
) -> dict[str, IdentityFinding]:
    """One finding per node (see the module docstring for the rule)."""
    by_id = {s.node_id: s for s in signatures}
    pairs: dict[tuple[str, str], PairComparison] = {}
    for i, a in enumerate(signatures):
        for b in signatures[i + 1:]:
            pairs[(a.node_id, b.node_id)] = pairs[(b.node_id, a.node_id)] = \
                compare(a, b, reference_text, threshold)

    def member_evidence(member: IdentityClaim) -> dict[str, Any]:
        signature = by_id[member.node_id]
        return {"reference_text_share": (match_share(signature.text_sha256, reference_text)
                                         if reference_text is not None else None),
                "answers": [h[:12] if h else None for h in signature.text_sha256],
                "latency_s": signature.latency_s}

    def compare_with_holder(member: IdentityClaim, holder: IdentityClaim
                            ) -> tuple[str, dict[str, Any]]:
        pair = pairs[(member.node_id, holder.node_id)]
        detail = (f"answers coincide with {holder.node_id} (registered earlier) on "
                  f"{pair.text_share:.0%} of identity prompts (text) and "
                  f"{pair.trace_share:.0%} (text + logprobs)")
        return detail, {"text_share": pair.text_share, "trace_share": pair.trace_share,
                        "reference_like": pair.reference_like,
                        "holder_latency_s": by_id[holder.node_id].latency_s}

    claims = [IdentityClaim(s.node_id, s.operator, s.seniority) for s in signatures]
    coinciding = [(a.node_id, b.node_id) for i, a in enumerate(signatures)
                  for b in signatures[i + 1:] if pairs[(a.node_id, b.node_id)].coincide]
    return group_identities(claims, coinciding, member_evidence, compare_with_holder)


def signature_from_answers(
    node_id: str,
    operator: str,
    seniority: float,
    answers: Sequence[tuple[str, Sequence[float | None] | None] | None],
    latency_s: float | None = None,
) -> IdentitySignature:
    """Hash a node's identity answers (text, reported logprobs), ``None`` = no answer."""
    return IdentitySignature(
        node_id=node_id, operator=operator, seniority=seniority,
        text_sha256=tuple(None if a is None else answer_sha256(a[0]) for a in answers),
        trace_sha256=tuple(None if a is None else trace_sha256(a[0], a[1]) for a in answers),
        latency_s=latency_s,
    )


def reference_hashes(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(answer_sha256(t) for t in texts)

# The identity prompts' vocabulary (the verification round's probes draw from it too).
WORDS: tuple[str, ...] = tuple(
    """time person year way day thing man world life hand part child eye woman place work week
    case point number group problem fact river stone cloud market window garden silver engine
    paper yellow quiet mountain letter bridge candle forest orange table music winter doctor
    city king ocean island train summer village teacher garden school story song road horse
    bread coffee winter light shadow mirror voice dream color paint glass metal wood sugar salt
    north south east west green blue red black white purple gold copper iron planet star moon
    history science language money family friend animal flower tree field farm castle tower""".split()
)
