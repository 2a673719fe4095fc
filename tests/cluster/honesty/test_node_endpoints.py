"""The endpoint policy in the honesty checks: verification rounds and streaming-job audits
reach only the nodes ``requester.endpoint_allowlist`` allows; a refused node is sent
nothing and its verdict says why, while the others are checked as usual and the trusted
reference (the operator's own server, on loopback) is reached outside the policy.

Loopback stands in for both sides (a test cannot reach a public address): 127.0.0.2 is
allowlisted and plays a public node, 127.0.0.1 is not and plays a private service, which
``private.test`` resolves to; ``169.254.169.254`` is the cloud metadata endpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cluster.core.errors import RegistrationError
from cluster.core.schemas import Node
from cluster.core.settings import (
    EndpointAllowlist,
    HonestySettings,
    ReferenceSettings,
    RequesterSettings,
    Settings,
)
from cluster.core.streaming import StreamingJob
from cluster.core.verdicts import Outcome
from cluster.honesty.job_audits import audit_registered_jobs, register_streaming_job
from cluster.honesty.verdicts import CHECKS
from cluster.honesty.verification import latest_verdicts, verify_registered_nodes
from cluster.nodes.policy import EndpointGuard
from cluster.storage.mongo import MongoStores
from cluster.testing.testnode import NodeBehaviour, TestNode

METADATA_URL = "http://169.254.169.254:1"
ALLOWED = EndpointAllowlist(networks=["127.0.0.2/32"])


async def private_lookup(host: str, port: int) -> list[str]:
    return ["127.0.0.1"] if host == "private.test" else ["127.0.0.2"]


@pytest.fixture
async def servers(smollm2_dir: Path) -> AsyncIterator[dict[str, TestNode]]:
    """trap: the private service (127.0.0.1); allowed: a node the policy lets through
    (127.0.0.2); reference: the trusted reference, on loopback too."""
    nodes = {"trap": TestNode(NodeBehaviour()),
             "allowed": TestNode(NodeBehaviour(), tokenizer_path=str(smollm2_dir),
                                 host="127.0.0.2"),
             "reference": TestNode(NodeBehaviour(), tokenizer_path=str(smollm2_dir))}
    for node in nodes.values():
        await node.start()
    yield nodes
    for node in nodes.values():
        await node.stop()


async def test_a_round_refuses_nodes_outside_the_policy_and_verifies_the_others(
    servers: dict[str, TestNode], mongo: MongoStores, smollm2_dir: Path,
) -> None:
    trap, allowed, reference = servers["trap"], servers["allowed"], servers["reference"]
    for node in (Node(node_id="a-metadata", url=METADATA_URL, model="smollm2"),
                 Node(node_id="b-private", url=f"http://private.test:{trap.port}",
                      model="smollm2"),
                 Node(node_id="c-allowed", url=allowed.base_url or "", model="smollm2")):
        await mongo.nodes.add(node)
    settings = HonestySettings(references={"smollm2": ReferenceSettings(
        url=reference.base_url, model_dir=smollm2_dir)})
    guard = EndpointGuard.of(ALLOWED, lookup=private_lookup)

    verdicts = await verify_registered_nodes(settings, mongo, seed=7, guard=guard)

    by_node: dict[str, dict[str, object]] = {}
    for v in verdicts:
        by_node.setdefault(v.node_id, {})[v.check] = v
    for node_id, said in (("a-metadata", "169.254.169.254, a cloud metadata address"),
                          ("b-private", "private.test resolves to 127.0.0.1, a loopback "
                                        "address")):
        mine = [v for v in verdicts if v.node_id == node_id]
        assert sorted(v.check for v in mine) == sorted(CHECKS), mine  # no evasion verdict
        for v in mine:
            assert v.outcome is Outcome.UNKNOWN
            assert v.reason.startswith("unknown: endpoint refused: ") and said in v.reason
            assert v.evidence["endpoint"] == "refused" and v.evidence["probes"] == "not_sent"
        # recorded, as any round's verdicts are
        stored = await latest_verdicts(mongo, [node_id])
        assert {(v.check, v.outcome) for v in stored} == {(c, Outcome.UNKNOWN) for c in CHECKS}
        assert all(said in v.reason for v in stored)
    assert trap.stats.requests == 0  # nothing reached the private service
    # the allowlisted node was verified as usual, against the reference on loopback
    assert allowed.stats.requests > 0 and reference.stats.requests > 0
    allowed_verdicts = [v for v in verdicts if v.node_id == "c-allowed"]
    assert {v.check for v in allowed_verdicts} >= set(CHECKS)
    assert not any("refused" in v.reason for v in allowed_verdicts), allowed_verdicts


def audit_settings(reference: TestNode, smollm2_dir: Path) -> Settings:
    settings = Settings(requester=RequesterSettings(endpoint_allowlist=ALLOWED))
    settings.honesty.references = {"smollm2": ReferenceSettings(
        url=reference.base_url, model_dir=smollm2_dir)}
    settings.receipts.audit_requests = 2
    settings.receipts.audit_sampled_requests = 0
    return settings


async def test_an_audit_sends_nothing_to_a_refused_job_and_audits_the_others(
    servers: dict[str, TestNode], mongo: MongoStores, smollm2_dir: Path,
) -> None:
    allowed, reference = servers["allowed"], servers["reference"]
    settings = audit_settings(reference, smollm2_dir)
    await mongo.nodes.add(Node(node_id="node-j", url=allowed.base_url or "", model="smollm2"))
    # registration refuses the metadata endpoint (a name re-pointed later is refused at audit)
    with pytest.raises(RegistrationError, match="169.254.169.254, a cloud metadata address"):
        await register_streaming_job(settings, mongo, "job-meta", "node-j", METADATA_URL,
                                     node_key="ab" * 32)
    for job_id, url in (("job-meta", METADATA_URL), ("job-ok", allowed.base_url or "")):
        await mongo.streaming_jobs.add(StreamingJob(
            job_id=job_id, node_id="node-j", url=url,  # type: ignore[arg-type]
            node_key="ab" * 32, model="smollm2", registered_at=1.0))

    audits = dict((job.job_id, report)
                  for job, report in await audit_registered_jobs(settings, mongo))

    refused = audits["job-meta"]
    assert refused.outcome is Outcome.UNKNOWN and refused.exchanges == 0
    [summary] = refused.verdicts
    assert summary.reason.startswith("unknown: endpoint refused: 169.254.169.254, a cloud "
                                     "metadata address")
    assert summary.evidence["address_class"] == "cloud metadata"
    stored = await mongo.verdicts.for_node("node-j", "streaming_job")
    assert any(r.evidence.get("job_id") == "job-meta" and r.outcome is Outcome.UNKNOWN
               for r in stored)
    # the allowlisted job was queried (the test node signs no receipts: they are refused)
    ok = audits["job-ok"]
    assert ok.exchanges == 2 and allowed.stats.requests >= 2
    assert ok.outcome is Outcome.FAIL and ok.receipts_refused == 2
