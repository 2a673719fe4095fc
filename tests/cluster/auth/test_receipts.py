"""Receipts: honest ones verify; each kind of tampering is refused with its reason."""

from __future__ import annotations

import pytest

from cluster.auth.keys import Ed25519Key, verify_signature
from cluster.auth.receipts import (
    JobAssignment,
    MemoryReplayGuard,
    Receipt,
    ReceiptProblem,
    ReceiptRejected,
    ReceiptSigner,
    ReceiptVerifier,
)
from cluster.storage.mongo import MongoStores

NODE_KEY = Ed25519Key(bytes(range(32)))
OTHER_KEY = Ed25519Key(bytes(range(1, 33)))
JOB = JobAssignment(job_id="job-1", node_id="node-a", node_key=NODE_KEY.public_key)
T0 = 1_750_000_000.0
INPUT = b'{"model":"m","prompt":"hello","temperature":0}'
OUTPUT = b'{"choices":[{"index":0,"text":" world"}]}'
SKEW_S = 5.0


def sign(key: Ed25519Key = NODE_KEY, *, request_id: str = "r1", output: bytes = OUTPUT,
         started: float = T0, finished: float = T0 + 0.5, job_id: str = "job-1") -> Receipt:
    return ReceiptSigner(key, job_id).sign(
        request_id=request_id, endpoint="/v1/completions", input_bytes=INPUT,
        output_bytes=output, started_at=started, finished_at=finished)


def verifier(guard: MemoryReplayGuard | None = None) -> ReceiptVerifier:
    return ReceiptVerifier(guard or MemoryReplayGuard(), SKEW_S, clock=lambda: T0 + 1.0)


async def verify(v: ReceiptVerifier, receipt: Receipt, *, output: bytes = OUTPUT,
                 request_id: str = "r1", received_at: float = T0 + 0.6) -> Receipt:
    return await v.verify(receipt, JOB, input_bytes=INPUT, output_bytes=output,
                          request_id=request_id, endpoint="/v1/completions",
                          sent_at=T0 - 0.01, received_at=received_at)


async def refused(v: ReceiptVerifier, receipt: Receipt, **kw: object) -> ReceiptProblem:
    with pytest.raises(ReceiptRejected) as info:
        await verify(v, receipt, **kw)  # type: ignore[arg-type]
    return info.value.problem


async def test_an_honest_receipt_verifies_and_survives_the_wire() -> None:
    receipt = sign()
    assert Receipt.from_wire(receipt.to_wire()) == receipt
    assert await verify(verifier(), Receipt.from_wire(receipt.to_wire())) == receipt
    assert receipt.ts_from_ms == 1_750_000_000_000 and receipt.ts_to_ms == 1_750_000_000_500
    assert verify_signature(NODE_KEY.public_key, receipt.canonical_bytes(), receipt.signature)


async def test_a_changed_output_is_refused() -> None:
    assert await refused(verifier(), sign(), output=OUTPUT.replace(b"world", b"worle")) \
        == ReceiptProblem.OUTPUT_MISMATCH
    # a node that signs the changed output is caught by the re-run, not here: but it cannot
    # hand the client one answer and sign another
    assert await refused(verifier(), sign(output=b"{}")) == ReceiptProblem.OUTPUT_MISMATCH


async def test_a_receipt_signed_with_another_key_is_refused() -> None:
    # the other key's own public key in the receipt: not the key the job is assigned to
    assert await refused(verifier(), sign(OTHER_KEY)) == ReceiptProblem.WRONG_KEY
    # the assigned key's name on it, the other key's signature: does not verify
    forged = sign(OTHER_KEY)
    claimed = forged.model_copy(update={"node_key": NODE_KEY.public_key})
    assert await refused(verifier(), claimed) == ReceiptProblem.BAD_SIGNATURE


async def test_a_forged_signature_is_refused() -> None:
    receipt = sign()
    flipped = receipt.signature[:-1] + ("0" if receipt.signature[-1] != "0" else "1")
    assert await refused(verifier(), receipt.model_copy(update={"signature": flipped})) \
        == ReceiptProblem.BAD_SIGNATURE
    # a signed field changed after signing (a longer time span billed)
    stretched = receipt.model_copy(update={"ts_from_ms": receipt.ts_from_ms - 60_000})
    assert await refused(verifier(), stretched) == ReceiptProblem.BAD_SIGNATURE


async def test_a_skewed_clock_is_refused() -> None:
    late = sign(started=T0 + 60, finished=T0 + 60.5)  # node clock a minute ahead
    assert await refused(verifier(), late) == ReceiptProblem.CLOCK_SKEW
    early = sign(started=T0 - 60, finished=T0 - 59.5)
    assert await refused(verifier(), early) == ReceiptProblem.CLOCK_SKEW
    # a work span claimed to start long before the client sent anything
    stretched = sign(started=T0 - 600, finished=T0 + 0.5)
    assert await refused(verifier(), stretched) == ReceiptProblem.CLOCK_SKEW
    backwards = sign(started=T0 + 0.5, finished=T0)
    assert await refused(verifier(), backwards) == ReceiptProblem.TIME_ORDER
    # within the bound is fine
    assert await verify(verifier(), sign(started=T0 + 3, finished=T0 + 4))


async def test_a_replayed_receipt_is_refused() -> None:
    v = verifier()
    receipt = sign()
    await verify(v, receipt)
    assert await refused(v, receipt) == ReceiptProblem.REPLAYED
    # a second, different receipt for the same request is a replay too
    assert await refused(v, sign(finished=T0 + 0.4)) == ReceiptProblem.REPLAYED


async def test_a_receipt_for_another_request_or_job_is_refused() -> None:
    receipt = sign(request_id="r1")
    assert await refused(verifier(), receipt, request_id="r2") == ReceiptProblem.WRONG_REQUEST
    assert await refused(verifier(), sign(job_id="job-2")) == ReceiptProblem.WRONG_JOB
    with pytest.raises(ReceiptRejected) as info:
        await verifier().verify(receipt, JOB, input_bytes=INPUT, output_bytes=OUTPUT,
                                endpoint="/v1/chat/completions", received_at=T0 + 0.6)
    assert info.value.problem == ReceiptProblem.WRONG_ENDPOINT
    with pytest.raises(ReceiptRejected) as info:
        await verifier().verify(receipt, JOB, input_bytes=INPUT + b" ", output_bytes=OUTPUT,
                                received_at=T0 + 0.6)
    assert info.value.problem == ReceiptProblem.INPUT_MISMATCH


async def test_a_refused_receipt_does_not_burn_its_request() -> None:
    v = verifier()
    assert await refused(v, sign(), output=b"tampered") == ReceiptProblem.OUTPUT_MISMATCH
    assert await verify(v, sign())


def test_malformed_receipts_are_refused_as_such() -> None:
    for text in ["", "{}", '{"job_id": 1}', sign().to_wire().replace('"version":1', '"version":2'),
                 sign().to_wire()[:-1] + ',"extra":1}']:
        with pytest.raises(ReceiptRejected) as info:
            Receipt.from_wire(text)
        assert info.value.problem == ReceiptProblem.MALFORMED


async def test_replay_protection_persists_in_mongodb(mongo: MongoStores, mongo_url: str) -> None:
    clock = lambda: T0 + 1.0  # noqa: E731 - a fixed clock
    receipt = sign()
    await ReceiptVerifier(mongo.receipts, SKEW_S, clock).verify(
        receipt, JOB, input_bytes=INPUT, output_bytes=OUTPUT, received_at=T0 + 0.6)
    stored = await mongo.receipts.get(receipt.replay_key)
    assert stored is not None and stored["digest"] == receipt.digest
    assert stored["node_id"] == "node-a" and stored["output_sha256"] == receipt.output_sha256

    # another validator process: its own connection, same database
    other = await MongoStores.connect(mongo_url, mongo.database.name)
    try:
        v2 = ReceiptVerifier(other.receipts, SKEW_S, clock)
        for candidate in (receipt, sign(finished=T0 + 0.3)):
            with pytest.raises(ReceiptRejected) as info:
                await v2.verify(candidate, JOB, input_bytes=INPUT, output_bytes=OUTPUT,
                                received_at=T0 + 0.6)
            assert info.value.problem == ReceiptProblem.REPLAYED
        assert await other.receipts.count(job_id="job-1") == 1
    finally:
        await other.close()
