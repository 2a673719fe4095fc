"""The extra traffic verification puts on a node, against the node's measuring traffic.

- **Verification traffic** is what the honesty rounds sent: every verdict carries the
  requests and tokens of its check (``evidence.traffic``; a batched request shared by
  several checks is split between them), so the sum over a node's verdicts is exact.
- **Measuring traffic** is what the measuring loop sent: one request per relayed prompt;
  prompt tokens as the Sampler counted them (``prompts.prompt_tokens``), completion tokens
  as the node reported them (``usage.completion_tokens`` of the relay), or the request's
  ``max_tokens`` where the answer has no usage (an upper bound).

The goal is at most ``max_traffic_share`` (10%) at default settings;
:func:`verification_due` is the gate a scheduler applies so that it holds by construction
once a node has been measured at all.

The loop does not scan prompts and relays for that: the same figures are kept as counters
(``cluster/storage/mongo/traffic.py``, per node and day), added in bulk as relays are
recorded (:func:`record_measuring`, from the loop's relay sink every
``honesty.traffic_flush_s``) and as rounds are recorded
(:func:`record_round_traffic`), and read for every node in one query (:func:`read_ledger`).
:func:`traffic_report` is the exact scan, kept for ``testbench scores`` and to check the
counters against.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Prompt, Relay
from cluster.core.settings import HonestySettings
from cluster.honesty.verdicts import ROUND_CHECKS, TRAFFIC_KEY, Traffic, Verdict
from cluster.storage.mongo import MongoStores, TrafficRow


@dataclass(frozen=True)
class TrafficReport:
    node_id: str
    verification: Traffic
    measuring: Traffic

    @property
    def request_share(self) -> float | None:
        """Verification requests per measuring request (None before any measuring)."""
        return self.verification.requests / self.measuring.requests \
            if self.measuring.requests else None

    @property
    def token_share(self) -> float | None:
        return self.verification.tokens / self.measuring.tokens if self.measuring.tokens else None

    def as_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "verification": self.verification.as_dict(),
                "measuring": self.measuring.as_dict(), "request_share": self.request_share,
                "token_share": self.token_share}


@dataclass(frozen=True)
class NodeTraffic(TrafficReport):
    """A node's counters over a window, as the loop's scheduler reads them."""

    rounds: int = 0
    last_round_at: float | None = None
    measuring_ok: int = 0

    @property
    def round_cost(self) -> Traffic:
        """What one of its rounds cost on average (nothing before its first)."""
        if not self.rounds:
            return Traffic()
        v = self.verification
        return Traffic(v.requests / self.rounds, round(v.prompt_tokens / self.rounds),
                       round(v.completion_tokens / self.rounds))

    @classmethod
    def from_row(cls, row: TrafficRow) -> NodeTraffic:
        m, v = row.measuring, row.verification
        return cls(row.node_id,
                   Traffic(v["requests"], int(v["prompt_tokens"]), int(v["completion_tokens"])),
                   Traffic(m["requests"], int(m["prompt_tokens"]), int(m["completion_tokens"])),
                   rounds=int(v["rounds"]), last_round_at=row.last_round_at,
                   measuring_ok=int(m["ok"]))


def completion_tokens(prompt: Prompt, usage: Mapping[str, Any] | None) -> int:
    """Completion tokens of one relay: as the node reported them, else the request's
    ``max_tokens`` (an upper bound)."""
    reported = usage.get("completion_tokens") if usage is not None else None
    if isinstance(reported, int) and not isinstance(reported, bool) and reported >= 0:
        return reported
    return int(prompt.max_output_tokens or 0)


def measuring_counts(relays: Iterable[Relay], prompts: Mapping[str, Prompt]
                     ) -> dict[str, dict[str, float]]:
    """Per node: requests (one per relay), prompt and completion tokens, ok relays; relays
    whose prompt is not in ``prompts`` are left out. The rule of :func:`measuring_traffic`."""
    out: dict[str, dict[str, float]] = {}
    for relay in relays:
        prompt = prompts.get(relay.prompt_id)
        if prompt is None:
            continue
        row = out.setdefault(relay.node_id, {"requests": 0.0, "prompt_tokens": 0.0,
                                             "completion_tokens": 0.0, "ok": 0.0})
        usage = relay.response.get("usage") if isinstance(relay.response, Mapping) else None
        row["requests"] += 1
        row["prompt_tokens"] += int(prompt.prompt_tokens or 0)
        row["completion_tokens"] += completion_tokens(
            prompt, usage if isinstance(usage, Mapping) else None)
        row["ok"] += 1 if relay.error_code == ErrorCode.OK else 0
    return out


class PendingCounts:
    """Measuring counts gathered between writes (:class:`actors.local.MongoRelaySink`
    writes them every ``honesty.traffic_flush_s``): per node, summed."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._counts)

    def add(self, counts: Mapping[str, Mapping[str, float]]) -> None:
        for node, row in counts.items():
            mine = self._counts.setdefault(node, {})
            for key, value in row.items():
                mine[key] = mine.get(key, 0.0) + value

    def take(self) -> dict[str, dict[str, float]]:
        counts, self._counts = self._counts, {}
        return counts


async def record_measuring(stores: MongoStores, counts: Mapping[str, Mapping[str, float]],
                           ts: float) -> int:
    """Add measuring counts (:func:`measuring_counts`, summed by :class:`PendingCounts`) to
    their nodes' counters of the day of ``ts`` (one bulk write)."""
    return await stores.traffic.add_measuring(counts, ts) if counts else 0


def round_traffic(verdicts: Iterable[Verdict]) -> dict[str, Traffic]:
    """Per node: what a round's checks sent it (every node of the round, even at 0)."""
    out: dict[str, Traffic] = {}
    for verdict in verdicts:
        out[verdict.node_id] = out.get(verdict.node_id, Traffic()) + verdict.traffic
    return out


async def record_round_traffic(stores: MongoStores, verdicts: Sequence[Verdict], ts: float
                               ) -> dict[str, Traffic]:
    """Add one round per node of ``verdicts``, with its traffic, to the counters."""
    traffic = round_traffic(verdicts)
    await stores.traffic.add_verification(
        {node: {"requests": t.requests, "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens, "rounds": 1}
         for node, t in traffic.items()}, ts)
    return traffic


async def read_ledger(stores: MongoStores, since_ts: float) -> dict[str, NodeTraffic]:
    """Every node's counters from ``since_ts``'s day on, in one query."""
    return {node: NodeTraffic.from_row(row)
            for node, row in (await stores.traffic.window(since_ts)).items()}


async def measuring_traffic(stores: MongoStores, node_id: str, since_ts: float) -> Traffic:
    """Requests and tokens the measuring loop sent ``node_id`` after ``since_ts``."""
    prompts = await stores.prompts.created_since(node_id, since_ts)
    if not prompts:
        return Traffic()
    relays = await stores.relays.usages([p["_id"] for p in prompts])
    requests = prompt_tokens = completion = 0
    for prompt in prompts:
        if prompt["_id"] not in relays:
            continue  # not sent (yet)
        requests += 1
        prompt_tokens += int(prompt.get("prompt_tokens") or 0)
        usage = relays[prompt["_id"]]
        reported = usage.get("completion_tokens") if usage is not None else None
        completion += int(reported) if isinstance(reported, int) and reported >= 0 \
            else int(prompt.get("max_output_tokens") or 0)
    return Traffic(float(requests), prompt_tokens, completion)


async def verification_traffic(stores: MongoStores, node_id: str, since_ts: float) -> Traffic:
    """Requests and tokens the honesty checks sent ``node_id`` after ``since_ts``."""
    total = Traffic()
    for record in await stores.verdicts.for_node(node_id):
        if record.check in ROUND_CHECKS and record.ts > since_ts:
            total = total + Traffic.from_dict(record.evidence.get(TRAFFIC_KEY))
    return total


async def traffic_report(stores: MongoStores, node_ids: Sequence[str], since_ts: float
                         ) -> list[TrafficReport]:
    """Per node: verification vs measuring traffic since ``since_ts``, scanned exactly from
    prompts, relays and verdicts: what the counters (:func:`read_ledger`, which the loop and
    ``testbench scores`` read) are checked against in tests."""
    return [TrafficReport(node, await verification_traffic(stores, node, since_ts),
                          await measuring_traffic(stores, node, since_ts))
            for node in node_ids]


def verification_due(settings: HonestySettings, verification: Traffic, measuring: Traffic,
                     next_round: Traffic) -> bool:
    """Whether one more round fits the budget: the first round always (a node is verified
    before it is trusted), later ones while verification stays within
    ``max_traffic_share`` of the measuring traffic in tokens and in requests."""
    if verification.requests == 0:
        return True
    limit = settings.max_traffic_share
    after = verification + next_round
    return after.tokens <= limit * measuring.tokens and after.requests <= limit * measuring.requests
