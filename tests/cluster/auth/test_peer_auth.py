"""Peer authentication through real HTTP: a small app behind the middleware, signed by
the httpx and aiohttp helpers; every refusal, and that a refused request changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from fastapi import FastAPI, Request
from honesty_servers import AppServer
from pydantic import ValidationError

from cluster.auth.keys import Ed25519Key
from cluster.auth.peers import (
    AuthProblem,
    AuthRefused,
    KeyRegistry,
    MemoryNonceStore,
    RequestSigner,
    RequestVerifier,
)
from cluster.core.settings import AuthSettings, load_settings
from cluster.storage.mongo import MongoNonceStore, MongoStores
from serve_apps.common.peer_auth import install_peer_auth

CONTROL = Ed25519Key(bytes([7]) * 32)
JOBS_ONLY = Ed25519Key(bytes([8]) * 32)
STRANGER = Ed25519Key(bytes([9]) * 32)
SETTINGS = AuthSettings(keys={
    "validator-1": {"public_key": CONTROL.public_key, "purposes": ["control"]},
    "job-client": {"public_key": JOBS_ONLY.public_key, "purposes": ["jobs"]},
}, max_skew_s=30.0, max_body_bytes=4096)


def counter_app(settings: AuthSettings) -> tuple[FastAPI, dict[str, Any]]:
    state: dict[str, Any] = {"count": 0, "last": None}
    app = FastAPI()
    install_peer_auth(app, settings, purpose="control")

    @app.post("/api/v1/add")
    async def add(request: Request) -> dict[str, Any]:
        body = await request.json()
        state["count"] += int(body["n"])
        state["last"] = getattr(request.state, "peer_key_id", None)
        return {"count": state["count"]}

    @app.get("/api/v1/count")
    async def count(request: Request) -> dict[str, Any]:
        return {"count": state["count"], "query": str(request.query_params)}

    return app, state


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, dict[str, Any]]]:
    app, state = counter_app(SETTINGS)
    server = AppServer(app)
    yield server.start(), state
    server.stop()


def signer(key: Ed25519Key = CONTROL, key_id: str = "validator-1") -> RequestSigner:
    return RequestSigner(key_id, key)


def post_signed(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(url, content=body, headers={"Content-Type": "application/json", **headers},
                      timeout=10)


def test_signed_requests_pass_with_httpx_and_the_route_knows_the_caller(
    served: tuple[str, dict[str, Any]],
) -> None:
    url, state = served
    with httpx.Client(auth=signer().httpx_auth, timeout=10) as client:
        before = state["count"]
        r = client.post(f"{url}/api/v1/add", json={"n": 2})
        assert r.status_code == 200 and state["count"] == before + 2
        assert state["last"] == "validator-1"
        r = client.get(f"{url}/api/v1/count", params={"b": "x y", "a": "1"})
        assert r.status_code == 200 and r.json()["query"] == "b=x+y&a=1"


async def test_signed_requests_pass_with_aiohttp(served: tuple[str, dict[str, Any]]) -> None:
    url, state = served
    before = state["count"]
    async with aiohttp.ClientSession(middlewares=[signer().aiohttp_middleware]) as http:
        async with http.post(f"{url}/api/v1/add", json={"n": 3}) as r:
            assert r.status == 200
        async with http.get(f"{url}/api/v1/count?z=%2F1&a=%C3%A9") as r:
            assert r.status == 200
    assert state["count"] == before + 3


def refusal(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["reason"]


def test_every_refusal_changes_nothing(served: tuple[str, dict[str, Any]]) -> None:
    url, state = served
    add = f"{url}/api/v1/add"
    body = b'{"n": 100}'
    before = state["count"]

    r = httpx.post(add, content=body, timeout=10)
    assert refusal(r) == (401, "unsigned") and "Testbench-Ed25519" in r.headers["www-authenticate"]
    partial = signer().headers("POST", add, body)
    del partial["x-testbench-nonce"]
    assert refusal(post_signed(add, body, partial)) == (401, "malformed")
    assert refusal(post_signed(add, body, signer(STRANGER, "stranger").headers("POST", add, body))
                   ) == (401, "unknown_key")
    for skew in (-31.0, 31.0):
        stale = signer().headers("POST", add, body, timestamp=signer()._clock() + skew)
        assert refusal(post_signed(add, body, stale)) == (401, "expired")
    # a registered key id with another key's signature
    assert refusal(post_signed(add, body, signer(STRANGER).headers("POST", add, body))
                   ) == (403, "bad_signature")
    # a signed request altered in flight: body, query, path, method
    signed = signer().headers("POST", add, body)
    assert refusal(post_signed(add, b'{"n": 999}', signed)) == (403, "bad_signature")
    assert refusal(post_signed(add + "?n=1", body, signer().headers("POST", add, body))
                   ) == (403, "bad_signature")
    assert refusal(post_signed(f"{url}/api/v1/count", body, signer().headers("POST", add, body))
                   ) == (403, "bad_signature")
    # signed for another node (host), presented to this one
    elsewhere = add.replace("127.0.0.1", "localhost")
    assert refusal(post_signed(add, body, signer().headers("POST", elsewhere, body))
                   ) == (403, "bad_signature")
    # a key registered for job routes only, on a control route
    assert refusal(post_signed(add, body, signer(JOBS_ONLY, "job-client").headers("POST", add, body))
                   ) == (403, "wrong_purpose")
    big = b'{"n": 1, "pad": "' + b"x" * 5000 + b'"}'
    r = post_signed(add, big, signer().headers("POST", add, big))
    assert r.status_code == 413
    assert state["count"] == before

    # a replay: the first copy is served, the second refused and not applied
    signed = signer().headers("POST", add, b'{"n": 1}')
    assert post_signed(add, b'{"n": 1}', signed).status_code == 200
    assert refusal(post_signed(add, b'{"n": 1}', signed)) == (403, "replayed")
    assert state["count"] == before + 1


def test_auth_is_off_without_keys_or_with_the_explicit_opt_out() -> None:
    for settings in (AuthSettings(), SETTINGS.model_copy(update={"enabled": False})):
        app, state = counter_app(settings)
        server = AppServer(app)
        url = server.start()
        try:
            assert httpx.post(f"{url}/api/v1/add", json={"n": 1}, timeout=10).status_code == 200
        finally:
            server.stop()
    assert SETTINGS.active and not AuthSettings().active


def test_auth_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="auth.keys is empty"):
        AuthSettings(enabled=True)
    with pytest.raises(ValidationError, match="invalid key ids"):
        AuthSettings(keys={"bad id": {"public_key": CONTROL.public_key}})
    with pytest.raises(ValidationError):
        AuthSettings(keys={"k": {"public_key": "00" * 31}})
    with pytest.raises(ValidationError, match="go together"):
        AuthSettings(signing_key_id="me")
    settings = load_settings(environ={"TESTBENCH_AUTH__ENABLED": "false",
                                      "TESTBENCH_RECEIPTS__MAX_CLOCK_SKEW_S": "2.5"})
    assert settings.auth.enabled is False and settings.receipts.max_clock_skew_s == 2.5


def test_the_signer_reads_its_key_from_settings(tmp_path: Any) -> None:
    key_file = tmp_path / "me.key"
    key_file.write_text(CONTROL.seed_hex + "\n")
    s = RequestSigner.from_settings(AuthSettings(signing_key_id="validator-1",
                                                 signing_key_file=key_file))
    assert s is not None and s.public_key == CONTROL.public_key
    assert RequestSigner.from_settings(AuthSettings()) is None


async def test_nonces_in_mongodb_are_shared_by_replicas(mongo: MongoStores) -> None:
    now = 1_750_000_000.0
    registry = KeyRegistry.from_settings(SETTINGS)
    collection = mongo.database[f"nonces_{uuid.uuid4().hex[:6]}"]
    replicas = [RequestVerifier(registry, MongoNonceStore(collection, lambda: now), "control",
                                30.0, lambda: now) for _ in range(2)]
    headers = {"host": "node-a:8000",
               **signer().sign("POST", "node-a:8000", "/api/v1/add", "", b"{}", timestamp=now)}
    assert (await replicas[0].verify("POST", "/api/v1/add", "", headers, b"{}")).key_id \
        == "validator-1"
    with pytest.raises(AuthRefused) as info:
        await replicas[1].verify("POST", "/api/v1/add", "", headers, b"{}")
    assert info.value.problem == AuthProblem.REPLAYED and info.value.status == 403


def test_apps_given_a_nonce_mongo_url_share_nonces_across_replicas(mongo_url: str) -> None:
    settings = SETTINGS.model_copy(update={"nonce_mongo_url": mongo_url,
                                           "nonce_mongo_database": f"n_{uuid.uuid4().hex[:8]}"})
    servers = [AppServer(counter_app(settings)[0]) for _ in range(2)]
    urls = [server.start() for server in servers]
    try:
        body = b'{"n": 1}'
        # replicas behind one address: the same Host header reaches either of them
        headers = {"host": "node-a:8000",
                   **signer().sign("POST", "node-a:8000", "/api/v1/add", "", body)}
        assert post_signed(f"{urls[0]}/api/v1/add", body, headers).status_code == 200
        assert refusal(post_signed(f"{urls[1]}/api/v1/add", body, headers)) == (403, "replayed")
    finally:
        for server in servers:
            server.stop()


async def test_memory_nonces_are_forgotten_once_their_timestamp_expired() -> None:
    now = [1_750_000_000.0]
    store = MemoryNonceStore(lambda: now[0])
    verifier = RequestVerifier(KeyRegistry.from_settings(SETTINGS), store, "control", 30.0,
                               lambda: now[0])
    for i in range(50):
        headers = {"host": "node-a", **signer().sign("GET", "node-a", "/x", "", b"",
                                                     timestamp=now[0], nonce=f"nonce-{i:012d}")}
        await verifier.verify("GET", "/x", "", headers, b"")
    assert len(store) == 50
    now[0] += 100.0
    await store.first_use("validator-1", "another-nonce-0000", now[0] + 31)
    assert len(store) == 1


def test_the_signed_host_ignores_case_and_default_ports() -> None:
    from cluster.auth.peers import canonical_request

    a = canonical_request("get", "Node-A:80", "/p", "q=1", "1.000", "n" * 16, "k", b"")
    b = canonical_request("GET", "node-a", "/p", "q=1", "1.000", "n" * 16, "k", b"")
    c = canonical_request("GET", "node-a:8080", "/p", "q=1", "1.000", "n" * 16, "k", b"")
    assert a == b != c
