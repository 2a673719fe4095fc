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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cluster.core.settings import HonestySettings
from cluster.honesty.verdicts import CHECKS, TRAFFIC_KEY, Traffic
from cluster.storage.mongo import MongoStores


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


async def measuring_traffic(stores: MongoStores, node_id: str, since_ts: float) -> Traffic:
    """Requests and tokens the measuring loop sent ``node_id`` after ``since_ts``."""
    prompts = await stores.prompts.created_since(node_id, since_ts)
    if not prompts:
        return Traffic()
    relays = await stores.relays.usages([p["_id"] for p in prompts])
    requests = prompt_tokens = completion_tokens = 0
    for prompt in prompts:
        if prompt["_id"] not in relays:
            continue  # not sent (yet)
        requests += 1
        prompt_tokens += int(prompt.get("prompt_tokens") or 0)
        usage = relays[prompt["_id"]]
        reported = usage.get("completion_tokens") if usage is not None else None
        completion_tokens += int(reported) if isinstance(reported, int) and reported >= 0 \
            else int(prompt.get("max_output_tokens") or 0)
    return Traffic(float(requests), prompt_tokens, completion_tokens)


async def verification_traffic(stores: MongoStores, node_id: str, since_ts: float) -> Traffic:
    """Requests and tokens the honesty checks sent ``node_id`` after ``since_ts``."""
    total = Traffic()
    for record in await stores.verdicts.for_node(node_id):
        if record.check in CHECKS and record.ts > since_ts:
            total = total + Traffic.from_dict(record.evidence.get(TRAFFIC_KEY))
    return total


async def traffic_report(stores: MongoStores, node_ids: Sequence[str], since_ts: float
                         ) -> list[TrafficReport]:
    """Per node: verification vs measuring traffic since ``since_ts`` (``testbench scores``)."""
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
