"""The loop's Auditor (actors/auditor.py) reaches nodes under the endpoint policy with the
Requester's allowlist (``requester.endpoint_allowlist``), and its trusted reference outside
it: a node or job at a refused address is sent nothing and its verdict says why, the
allowlisted ones are verified and audited in the same steps.

No Ray: the Auditor is a plain class (``actors/remote.py`` makes it an actor). 127.0.0.2
(allowlisted) plays a public node; the reference listens on 127.0.0.1, which the policy
refuses: it is reached only because references have a session of their own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from actors.auditor import Auditor
from cluster.core.schemas import Node
from cluster.core.settings import (
    EndpointAllowlist,
    ReferenceSettings,
    RequesterSettings,
    Settings,
    StoreSettings,
)
from cluster.core.streaming import StreamingJob
from cluster.core.verdicts import Outcome
from cluster.honesty.verdicts import CHECKS
from cluster.honesty.verification import latest_verdicts
from cluster.storage.mongo import MongoStores
from cluster.testing.testnode import NodeBehaviour, TestNode

METADATA_URL = "http://169.254.169.254:1"
KEY = "ab" * 32


@pytest.fixture
async def servers(smollm2_dir: Path) -> AsyncIterator[dict[str, TestNode]]:
    nodes = {"allowed": TestNode(NodeBehaviour(), tokenizer_path=str(smollm2_dir),
                                 host="127.0.0.2"),
             "reference": TestNode(NodeBehaviour(), tokenizer_path=str(smollm2_dir))}
    for node in nodes.values():
        await node.start()
    yield nodes
    for node in nodes.values():
        await node.stop()


async def test_the_auditor_refuses_nodes_outside_the_policy_and_checks_the_others(
    servers: dict[str, TestNode], mongo_url: str, smollm2_dir: Path,
) -> None:
    allowed, reference = servers["allowed"], servers["reference"]
    settings = Settings(
        stores=StoreSettings(mongo_url=mongo_url, mongo_database=f"a_{uuid.uuid4().hex[:10]}"),
        requester=RequesterSettings(
            endpoint_allowlist=EndpointAllowlist(networks=["127.0.0.2/32"])))
    settings.honesty.references = {"smollm2": ReferenceSettings(
        url=reference.base_url, model_dir=smollm2_dir)}
    settings.receipts.audit_requests = 2
    settings.receipts.audit_sampled_requests = 0
    metadata = Node(node_id="a-metadata", url=METADATA_URL, model="smollm2")
    public = Node(node_id="b-allowed", url=allowed.base_url or "", model="smollm2")
    jobs = [StreamingJob(job_id=job_id, node_id=node_id, url=url,  # type: ignore[arg-type]
                         node_key=KEY, model="smollm2", registered_at=1.0)
            for job_id, node_id, url in (("job-meta", "a-metadata", METADATA_URL),
                                         ("job-ok", "b-allowed", allowed.base_url))]
    auditor = Auditor(settings)
    try:
        summary = await auditor.verify([metadata, public])
        audits = await auditor.audit(jobs)
    finally:
        await auditor.close()

    assert summary["nodes"] == ["a-metadata", "b-allowed"]
    mongo = await MongoStores.connect(mongo_url, settings.stores.mongo_database)
    try:
        refused = await latest_verdicts(mongo, ["a-metadata"])
        allowed_verdicts = await latest_verdicts(mongo, ["b-allowed"])
    finally:
        await mongo.close()
    round_refused = [v for v in refused if v.check in CHECKS]
    assert {v.check for v in round_refused} == set(CHECKS)
    for v in round_refused:
        assert v.outcome is Outcome.UNKNOWN
        assert v.reason.startswith("unknown: endpoint refused: 169.254.169.254, a cloud "
                                   "metadata address"), v.reason
    [job_verdict] = [v for v in refused if v.check == "streaming_job"]
    assert job_verdict.outcome is Outcome.UNKNOWN and "cloud metadata" in job_verdict.reason
    assert audits["job-meta"]["outcome"] == "unknown" and audits["job-meta"]["exchanges"] == 0
    # the allowlisted node was verified against the reference (on loopback) and its job
    # audited (the test node signs no receipts: they are refused)
    assert allowed.stats.requests > 0 and reference.stats.requests > 0
    assert {v.check for v in allowed_verdicts} >= set(CHECKS)
    assert not any("refused" in v.reason for v in allowed_verdicts if v.check in CHECKS)
    assert audits["job-ok"]["exchanges"] == 2 and audits["job-ok"]["outcome"] == "fail"
