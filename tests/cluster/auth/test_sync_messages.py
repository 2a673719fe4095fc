"""Outer-sync messages between MLNodes: a signed message verifies; every other one is refused
with its reason before a byte of its body is parsed."""

from __future__ import annotations

import pytest

from cluster.auth.keys import Ed25519Key
from cluster.auth.sync_messages import (
    HEADER_STEP,
    SyncMessageVerifier,
    SyncProblem,
    SyncRefused,
    refusal_from_answer,
    sign_sync_message,
)

PEER = Ed25519Key(bytes([7]) * 32)
STRANGER = Ed25519Key(bytes([8]) * 32)
BODY = b"\x00\x01 not parsed by the verifier"
VERIFIER = SyncMessageVerifier("run-1", [PEER.public_key], max_body_bytes=1024)


def refusal(headers: dict[str, str], body: bytes = BODY) -> tuple[SyncProblem, int]:
    with pytest.raises(SyncRefused) as info:
        VERIFIER.verify(headers, body)
    return info.value.problem, info.value.status


def test_a_registered_peers_signed_message_verifies() -> None:
    env = VERIFIER.verify(sign_sync_message(PEER, "run-1", 3, BODY), BODY)
    assert (env.run_id, env.outer_step, env.sender) == ("run-1", 3, PEER.public_key)


def test_each_bad_message_is_refused_with_its_reason_and_status() -> None:
    good = sign_sync_message(PEER, "run-1", 3, BODY)
    assert refusal(sign_sync_message(STRANGER, "run-1", 3, BODY)) == (
        SyncProblem.UNKNOWN_SENDER, 401)
    assert refusal(good, BODY + b"!") == (SyncProblem.BAD_SIGNATURE, 403)  # body changed
    assert refusal({**good, HEADER_STEP: "4"}) == (SyncProblem.BAD_SIGNATURE, 403)  # step changed
    # a genuine message of the same peer, for another training run
    assert refusal(sign_sync_message(PEER, "run-2", 3, BODY)) == (SyncProblem.WRONG_RUN, 403)
    assert refusal({k: v for k, v in good.items() if k != HEADER_STEP}) == (
        SyncProblem.MALFORMED, 400)
    assert refusal({**good, HEADER_STEP: "-1"}) == (SyncProblem.MALFORMED, 400)
    assert refusal(good, b"x" * 2048) == (SyncProblem.TOO_LARGE, 413)


def test_the_sender_rebuilds_the_refusal_from_the_answer() -> None:
    refused = SyncRefused(SyncProblem.REPLAYED, "already held")
    import json

    again = refusal_from_answer(refused.status, json.dumps(refused.body()).encode())
    assert (again.problem, again.status, again.detail) == (SyncProblem.REPLAYED, 409,
                                                           "already held")
    # no JSON refusal: the node's app is not there yet (or a proxy failed): retry
    assert refusal_from_answer(404, b"Not Found").problem == SyncProblem.NOT_TRAINING
    assert refusal_from_answer(502, b"bad gateway").problem == SyncProblem.NOT_TRAINING
