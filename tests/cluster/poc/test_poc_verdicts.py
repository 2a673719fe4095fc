"""Verdicts land in MongoDB (the session's embedded nx-27017) and replays overwrite them."""

from __future__ import annotations

import uuid

from cluster.core.settings import StoreSettings
from cluster.poc.validator import Verdict, VerdictEvidence
from cluster.poc.verdicts import VERDICTS, record_verdicts
from cluster.storage.mongo import MongoStores


def verdict(fraud: bool) -> Verdict:
    return Verdict(
        verdict_id=f"v-{fraud}", node_id="n1", public_key="pk", seed="s", r_target=1.3,
        model_fingerprint="f", n_claimed=1000, n_unique=1000, n_sampled=200,
        n_mismatch=20 if fraud else 0, mismatch_rate=0.1 if fraud else 0.0,
        honest_mismatch_rate=5e-4, p_value=1e-30 if fraud else 1.0, p_value_threshold=1e-7,
        fraud=fraud, sample_seed=7, validated_at=1.0,
        evidence=VerdictEvidence(mismatches=[], sampled_nonces_sha256="h", duplicate_nonces=0,
                                 distance_tolerance=1e-5, weights_sha256="w", validation_s=0.02),
    )


async def test_verdicts_are_upserted_by_id(session_stores: StoreSettings) -> None:
    assert session_stores.mongo_url
    mongo = await MongoStores.connect(session_stores.mongo_url, f"t_{uuid.uuid4().hex[:10]}",
                                      ensure_indexes=False)
    try:
        assert await record_verdicts(mongo, [verdict(True), verdict(False)]) == 2
        assert await record_verdicts(mongo, [verdict(True)]) == 1  # a replay
        docs = {d["_id"]: d async for d in mongo.collection(VERDICTS).find({})}
        assert set(docs) == {"v-True", "v-False"}
        assert docs["v-True"]["fraud"] is True and docs["v-True"]["p_value"] == 1e-30
        assert docs["v-True"]["evidence"]["weights_sha256"] == "w"
        assert Verdict.model_validate({k: v for k, v in docs["v-False"].items()
                                       if k not in ("_id", "kind")}) == verdict(False)
    finally:
        await mongo.close()
