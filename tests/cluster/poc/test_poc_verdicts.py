"""Verdicts land in MongoDB (the session's embedded nx-27017) as the one stored verdict
shape, and replays overwrite them."""

from __future__ import annotations

import uuid

from cluster.core.settings import StoreSettings
from cluster.core.verdicts import Check, Outcome
from cluster.poc.validator import Verdict, VerdictEvidence
from cluster.poc.verdicts import record_verdicts
from cluster.storage.mongo import MongoStores


def verdict(fraud: bool, n_sampled: int = 200) -> Verdict:
    return Verdict(
        verdict_id=f"v-{fraud}-{n_sampled}", node_id="n1", public_key="pk", seed="s",
        r_target=1.3, model_fingerprint="f", n_claimed=1000, n_unique=1000,
        n_sampled=n_sampled, n_mismatch=20 if fraud else 0, mismatch_rate=0.1 if fraud else 0.0,
        honest_mismatch_rate=5e-4, p_value=1e-30 if fraud else 1.0, p_value_threshold=1e-7,
        fraud=fraud, sample_seed=7, validated_at=1.0,
        evidence=VerdictEvidence(mismatches=[], sampled_nonces_sha256="h", duplicate_nonces=0,
                                 distance_tolerance=1e-5, weights_sha256="w", validation_s=0.02),
    )


def test_a_validation_with_nothing_sampled_is_unknown_not_a_pass() -> None:
    assert verdict(True).outcome is Outcome.FAIL and verdict(False).outcome is Outcome.PASS
    record = verdict(False, n_sampled=0).to_record()
    assert record.outcome is Outcome.UNKNOWN and not record.passed
    assert record.reason.startswith("unknown")


async def test_verdicts_are_upserted_by_id(session_stores: StoreSettings) -> None:
    assert session_stores.mongo_url
    mongo = await MongoStores.connect(session_stores.mongo_url, f"t_{uuid.uuid4().hex[:10]}",
                                      ensure_indexes=False)
    try:
        assert await record_verdicts(mongo, [verdict(True), verdict(False)]) == 2
        assert await record_verdicts(mongo, [verdict(True)]) == 1  # a replay
        stored = {r.verdict_id: r for r in await mongo.verdicts.for_node("n1")}
        assert set(stored) == {"v-True-200", "v-False-200"}
        fraud = stored["v-True-200"]
        assert (fraud.check, fraud.outcome, fraud.ts) == (Check.POC, Outcome.FAIL, 1.0)
        assert fraud.evidence["p_value"] == 1e-30 and fraud.evidence["weights_sha256"] == "w"
        assert stored["v-False-200"] == verdict(False).to_record()
    finally:
        await mongo.close()
