"""Version-2 receipts: a seeded sampled answer's seed and token ids, committed and checked.

The token ids travel in the answer (vLLM's ``token_ids`` per choice); the receipt signs
their digest and the seed. A receipt whose ids or seed differ from what the client sent and
got is refused, whichever side was altered; version-1 receipts keep their signed bytes.
"""

from __future__ import annotations

import json

import pytest

from cluster.auth.keys import Ed25519Key
from cluster.auth.receipts import (
    JobAssignment,
    MemoryReplayGuard,
    Receipt,
    ReceiptProblem,
    ReceiptRejected,
    ReceiptSigner,
    ReceiptVerifier,
    TokenCommitment,
    token_ids_digest,
)
from cluster.streaming import protocol as wire

NODE_KEY = Ed25519Key(bytes(range(32)))
JOB = JobAssignment(job_id="job-1", node_id="node-a", node_key=NODE_KEY.public_key)
T0 = 1_750_000_000.0
SEED = 4242
INPUT = json.dumps({"model": "m", "prompt": "Once upon a time", "temperature": 0.7,
                    "seed": SEED, "max_tokens": 3}).encode()
IDS = [[12, 345, 2]]


def answer(ids: list[list[int]]) -> bytes:
    return json.dumps({"choices": [{"index": i, "text": "x", "token_ids": t}
                                   for i, t in enumerate(ids)]}).encode()


def sign(output: bytes, commitment: TokenCommitment | None) -> Receipt:
    return ReceiptSigner(NODE_KEY, "job-1").sign(
        request_id="r1", endpoint="/v1/completions", input_bytes=INPUT, output_bytes=output,
        started_at=T0, finished_at=T0 + 0.5, commitment=commitment)


async def check(receipt: Receipt, output: bytes, commitment: TokenCommitment | None) -> None:
    verifier = ReceiptVerifier(MemoryReplayGuard(), 5.0, clock=lambda: T0 + 1.0)
    await verifier.verify(receipt, JOB, input_bytes=INPUT, output_bytes=output, request_id="r1",
                          endpoint="/v1/completions", sent_at=T0, received_at=T0 + 0.6,
                          commitment=commitment)


async def problem(receipt: Receipt, output: bytes, commitment: TokenCommitment | None
                  ) -> ReceiptProblem:
    with pytest.raises(ReceiptRejected) as info:
        await check(receipt, output, commitment)
    return info.value.problem


def committed(output: bytes, seed: int = SEED) -> TokenCommitment | None:
    ids = wire.answer_token_ids(output, streamed=False)
    return None if ids is None else TokenCommitment(seed=seed, token_ids=ids)


async def test_a_committed_answer_verifies_and_survives_the_wire() -> None:
    out = answer(IDS)
    receipt = sign(out, TokenCommitment(seed=SEED, token_ids=IDS))
    assert receipt.version == 2 and receipt.seed == SEED
    assert receipt.token_ids_sha256 == token_ids_digest(IDS)
    assert Receipt.from_wire(receipt.to_wire()) == receipt
    await check(Receipt.from_wire(receipt.to_wire()), out, committed(out))


async def test_altered_token_ids_are_refused_whichever_side_was_altered() -> None:
    out = answer(IDS)
    receipt = sign(out, TokenCommitment(seed=SEED, token_ids=IDS))
    altered = answer([[12, 346, 2]])
    # the answer's ids changed after signing: the bytes no longer match
    assert await problem(receipt, altered, committed(altered)) is ReceiptProblem.OUTPUT_MISMATCH
    # the node signs the bytes it sent but commits to other ids
    lying = sign(out, TokenCommitment(seed=SEED, token_ids=[[12, 346, 2]]))
    assert await problem(lying, out, committed(out)) is ReceiptProblem.TOKEN_IDS_MISMATCH
    # the committed digest edited in the receipt: the signature fails
    forged = receipt.model_copy(update={"token_ids_sha256": token_ids_digest([[12, 346, 2]])})
    assert await problem(forged, out, committed(out)) is ReceiptProblem.BAD_SIGNATURE
    # the ids dropped from the answer: nothing to hold the commitment against
    bare = json.dumps({"choices": [{"index": 0, "text": "x"}]}).encode()
    bare_receipt = sign(bare, TokenCommitment(seed=SEED, token_ids=IDS))
    assert await problem(bare_receipt, bare, committed(bare)) is ReceiptProblem.TOKEN_IDS_MISMATCH


async def test_a_commitment_to_another_seed_is_refused() -> None:
    out = answer(IDS)
    receipt = sign(out, TokenCommitment(seed=SEED + 1, token_ids=IDS))
    assert await problem(receipt, out, committed(out)) is ReceiptProblem.SEED_MISMATCH


def test_version_1_receipts_keep_their_signed_bytes() -> None:
    receipt = sign(answer(IDS), None)
    assert receipt.version == 1 and receipt.seed is None
    assert b"seed" not in receipt.canonical_bytes() and "token_ids" not in receipt.to_wire()
    with pytest.raises(ReceiptRejected, match="version-2 receipt has both"):
        Receipt.from_wire(json.dumps({**json.loads(receipt.to_wire()), "seed": 1}))


def test_stream_token_ids_are_joined_per_choice() -> None:
    chunks = [{"choices": [{"index": 0, "text": "a", "token_ids": [1, 2]}]},
              {"choices": [{"index": 1, "text": "b", "token_ids": [7]}]},
              {"choices": [{"index": 0, "text": "c", "token_ids": [3]}]}]
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    assert wire.answer_token_ids(stream + b"data: [DONE]\n\n", streamed=True) == [[1, 2, 3], [7]]
    assert wire.answer_token_ids(b'{"choices":[{"index":0,"text":"x"}]}', streamed=False) is None
    assert wire.answer_token_ids(b"not json", streamed=False) is None
