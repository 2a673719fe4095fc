"""What the validator knows about each node's honesty, read in one pass: the latest
verdicts, the loop's identity findings and verification vs measuring traffic."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cluster.core.settings import Settings
from cluster.honesty.traffic import NodeTraffic, TrafficReport, read_ledger
from cluster.honesty.verdicts import Traffic, Verdict
from cluster.honesty.verification import latest_verdicts
from cluster.storage.connections import open_mongo
from cluster.storage.mongo import MongoStores
from cluster.tasks.identity import IdentityFinding
from cluster.tasks.signature import read_signature_findings


@dataclass(frozen=True)
class HonestyView:
    verdicts: list[Verdict]
    signatures: dict[str, IdentityFinding]
    traffic: list[TrafficReport]


async def read_honesty(settings: Settings, mongo: MongoStores) -> HonestyView:
    """Each node's latest verdicts, the loop's identity findings and its verification vs
    measuring traffic over the days of the buffer TTL window, from one registry read. The
    traffic is the counters the loop's scheduler weighs (``cluster/honesty/traffic.py``):
    what is shown is what is enforced."""
    nodes = await mongo.nodes.list()
    node_ids = [n.node_id for n in nodes]
    since = time.time() - settings.manager.sample_ttl_s
    ledger: dict[str, TrafficReport] = dict(await read_ledger(mongo, since))
    return HonestyView(
        verdicts=await latest_verdicts(mongo, node_ids),
        signatures=await read_signature_findings(settings, mongo, nodes),
        traffic=[ledger.get(n) or NodeTraffic(n, Traffic(), Traffic()) for n in node_ids],
    )


async def fetch_signature_findings(settings: Settings) -> dict[str, IdentityFinding]:
    """The identity grouping rule over the loop's signature samples (buffer TTL window)."""
    async with open_mongo(settings) as mongo:
        return await read_signature_findings(settings, mongo)
