"""The PoC node Serve app through real HTTP: pow routes, control API, state machine,
and peer authentication of every control route (signed requests only).

Self-contained: reuses Ray/Serve when this session already runs them (another module's
fixtures), else starts Ray with 4 logical CPUs and Serve on a free port. The app has its
own name and route prefix and is deleted at the end; Serve itself is left running.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import ray
import requests
from ray import serve

from cluster.auth.keys import Ed25519Key
from cluster.auth.peers import RequestSigner
from cluster.cli.poc import add_parser as add_poc_parser
from cluster.cli.poc import run as cmd_poc
from cluster.core.settings import AuthSettings, EndpointAllowlist, RequesterSettings, Settings
from cluster.poc.compute import PocComputer, configure_torch
from cluster.poc.config import PocModelParams, ValidationConfig
from cluster.poc.protocol import PowInitRequest
from cluster.poc.validator import ClaimedProof, PocValidator
from serve_apps.poc.deployers import LlmEndpoint
from serve_apps.poc.server import poc_node_app

pytestmark = pytest.mark.usefixtures("torch_settings_restored")

APP_NAME = "poc-node-test"
PREFIX = "/poc-node-test"
MODEL = PocModelParams(dim=32, n_layers=1, n_heads=4, vocab_size=512, seq_len=8, out_dim=32)
VALIDATOR_KEY = Ed25519Key(bytes([41]) * 32)  # registered for control routes
JOBS_KEY = Ed25519Key(bytes([42]) * 32)  # registered, but for job routes only
STRANGER_KEY = Ed25519Key(bytes([43]) * 32)  # not registered
SIGNER = RequestSigner("validator", VALIDATOR_KEY)
MAX_SKEW_S = 30.0
AUTH = AuthSettings(keys={
    "validator": {"public_key": VALIDATOR_KEY.public_key, "purposes": ["control"]},
    "job-client": {"public_key": JOBS_KEY.public_key, "purposes": ["jobs"]},
}, max_skew_s=MAX_SKEW_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fake_deployer() -> Any:
    """A deployer that deploys nothing; defined locally so Ray pickles it by value."""

    class FakeDeployer:
        async def deploy(self, model: str, config: dict[str, Any]) -> LlmEndpoint:
            return LlmEndpoint(model=model, app_name="fake-llm", route_prefix="/fake-llm")

        async def teardown(self, endpoint: LlmEndpoint) -> None:
            return None

    return FakeDeployer()


class CallbackReceiver:
    """A tiny HTTP server that records JSON POSTs by path."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's spelling
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/poc"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="module")
def node_url() -> Iterator[str]:
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    from ray.serve.context import _get_global_client  # the running proxy's port

    if _get_global_client(raise_if_no_controller_running=False) is None:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    port = _get_global_client().http_config.port
    config = {"workers": 2, "cpus_per_worker": 0.25, "threads_per_worker": 1,
              "batches_per_chunk": 2, "callback_timeout_s": 5.0,
              "auth": AUTH.model_dump(mode="json")}
    serve.run(poc_node_app(config, deployer=_fake_deployer()), name=APP_NAME,
              route_prefix=PREFIX)
    try:
        yield f"http://127.0.0.1:{port}{PREFIX}/api/v1"
    finally:
        serve.delete(APP_NAME)
        if started_ray:
            ray.shutdown()


@pytest.fixture()
def receiver() -> Iterator[CallbackReceiver]:
    r = CallbackReceiver()
    yield r
    r.close()


def send(method: str, url: str, body: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None, data: bytes | None = None) -> requests.Response:
    """A request with exactly these bytes and headers (nothing added but Content-Type)."""
    if data is None:
        data = b"" if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return requests.request(method, url, data=data, headers=all_headers, timeout=30)


def call(method: str, url: str, body: dict[str, Any] | None = None) -> requests.Response:
    """A request signed by the registered validator key (the node takes no other)."""
    data = b"" if body is None else json.dumps(body).encode()
    return send(method, url, headers=SIGNER.headers(method, url, data), data=data)


def wait_for(pred: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def init_body(url: str | None = None, **kw: Any) -> dict[str, Any]:
    body = {"block_hash": "0xfeed", "public_key": "node-pk", "r_target": 1.36, "batch_size": 32,
            "params": MODEL.model_dump(), "url": url, **kw}
    return PowInitRequest.model_validate(body).model_dump(mode="json")


def train_body() -> dict[str, Any]:
    return {"run_id": "r1", "model": "m", "dataset": {"files": ["d.jsonl"]},
            "output_dir": "/tmp/testbench-train-r1"}


def pow_status(base: str) -> dict[str, Any]:
    return call("GET", f"{base}/pow/status").json()


def test_generation_over_http_yields_proofs_a_validator_accepts(
    node_url: str, receiver: CallbackReceiver
) -> None:
    assert call("GET", f"{node_url}/state").json()["state"] == "STOPPED"
    r = call("POST", f"{node_url}/pow/init/generate", init_body(receiver.url))
    assert r.status_code == 200 and r.json()["state"] == "POW"
    wait_for(lambda: pow_status(node_url)["batches"] >= 3)
    status = pow_status(node_url)
    assert status["status"] == "GENERATING" and status["workers"] == 2
    assert status["nonces_per_s"] > 0
    assert call("POST", f"{node_url}/pow/stop").json()["state"] == "STOPPED"

    got = call("GET", f"{node_url}/pow/batches?offset=0&limit=100000").json()
    nonces = [n for b in got["batches"] for n in b["nonces"]]
    dists = [d for b in got["batches"] for d in b["dist"]]
    assert got["total"] == len(got["batches"]) >= 3 and len(nonces) == len(set(nonces))
    configure_torch(1)
    round_params = PowInitRequest.model_validate(init_body()).round_params()
    validator = PocValidator(PocComputer(round_params, "validator"), ValidationConfig())
    verdict = validator.validate(
        ClaimedProof(node_id="n", public_key="node-pk", nonces=nonces, distances=dists), 7)
    assert not verdict.fraud and verdict.n_mismatch == 0
    # the same batches reached the callback, in order
    assert [p for p, _ in receiver.posts] == ["/poc/generated"] * got["total"]
    assert [b for _, b in receiver.posts] == got["batches"]


def test_refused_transitions_answer_409(node_url: str) -> None:
    assert call("POST", f"{node_url}/pow/init", init_body()).status_code == 200
    r = call("POST", f"{node_url}/inference/up", {"model": "smollm2"})
    assert r.status_code == 409 and "POST /api/v1/pow/stop first" in r.json()["detail"]
    r = call("POST", f"{node_url}/pow/init/generate", init_body())
    assert r.status_code == 409 and "already initialised" in r.json()["detail"]
    assert call("POST", f"{node_url}/inference/down").status_code == 409
    r = call("POST", f"{node_url}/train/start", train_body())
    assert r.status_code == 409 and "POST /api/v1/pow/stop first" in r.json()["detail"]
    assert call("POST", f"{node_url}/pow/stop").status_code == 200
    # this node has no training key: it says so rather than pretend to train
    r = call("POST", f"{node_url}/train/start", train_body())
    assert r.status_code == 503 and "no training key" in r.json()["detail"]
    status = call("GET", f"{node_url}/train/status").json()
    assert status == {"node_state": "STOPPED", "node_public_key": None, "run": None}

    r = call("POST", f"{node_url}/inference/up", {"model": "smollm2", "config": {"a": 1}})
    assert r.status_code == 200 and r.json()["state"] == "INFERENCE"
    wait_for(lambda: call("GET", f"{node_url}/state").json()["inference"]["status"] == "running")
    state = call("GET", f"{node_url}/state").json()
    assert state["state"] == "INFERENCE" and state["inference"]["app_name"] == "fake-llm"
    r = call("POST", f"{node_url}/pow/init/generate", init_body())
    assert r.status_code == 409 and "inference/down first" in r.json()["detail"]
    assert call("POST", f"{node_url}/pow/stop").status_code == 409
    assert call("POST", f"{node_url}/inference/up", {"model": "x"}).status_code == 409
    assert call("POST", f"{node_url}/inference/down").json()["state"] == "STOPPED"
    state = call("GET", f"{node_url}/state").json()
    assert state == {"state": "STOPPED", "pow": "STOPPED", "inference": None}
    # malformed bodies are refused before they reach the node
    assert call("POST", f"{node_url}/pow/init", {**init_body(), "bogus": 1}).status_code == 422
    assert call("POST", f"{node_url}/inference/up", {}).status_code == 422


def test_validation_phase_over_http(node_url: str) -> None:
    r = call("POST", f"{node_url}/pow/init/validate", init_body(fraud_threshold=1e-3))
    assert r.status_code == 200
    wait_for(lambda: pow_status(node_url)["status"] == "VALIDATING")
    configure_torch(1)
    other = PocComputer(PowInitRequest.model_validate(init_body()).round_params(), "other-pk")
    nonces, dist = other.find_valid(range(200))
    batch = {"public_key": "other-pk", "block_hash": "0xfeed", "nonces": nonces, "dist": dist}
    ok = call("POST", f"{node_url}/pow/validate", batch).json()
    assert ok["received_dist"] == dist and ok["n_invalid"] == 0 and not ok["fraud_detected"]
    forged = call("POST", f"{node_url}/pow/validate",
                  {**batch, "dist": [d * 0.99 for d in dist]}).json()
    assert forged["fraud_detected"] and forged["n_invalid"] == len(nonces)
    r = call("POST", f"{node_url}/pow/validate", {**batch, "block_hash": "0xother"})
    assert r.status_code == 400
    assert call("POST", f"{node_url}/pow/phase/generate").status_code == 200
    assert call("POST", f"{node_url}/pow/validate", batch).status_code == 409
    assert call("POST", f"{node_url}/stop").json()["state"] == "STOPPED"


def test_cli_round_judges_the_node_honest(
    node_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    parser = argparse.ArgumentParser(prog="testbench")
    add_poc_parser(parser.add_subparsers(dest="cmd", required=True))
    base = node_url.removesuffix("/api/v1")
    small = ["--dim", "32", "--layers", "1", "--heads", "4", "--vocab", "512", "--seq-len", "8",
             "--out-dim", "32", "--batch-size", "32"]
    args = parser.parse_args(["poc", "round", "--node", f"local={base}", "--seconds", "2",
                              "--valid-fraction", "0.2", "--sample-seed", "5", "--no-store",
                              *small])
    key_file = tmp_path / "validator.key"
    key_file.write_text(VALIDATOR_KEY.seed_hex)
    # the CLI signs its control requests with the key the settings name
    # ... and reaches the node on loopback, which the endpoint policy refuses by default
    settings = Settings(auth=AuthSettings(signing_key_id="validator", signing_key_file=key_file),
                        requester=RequesterSettings(endpoint_allowlist=EndpointAllowlist.loopback()))
    code = cmd_poc(settings, args)
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(row for row in out.splitlines() if row.startswith("local"))
    assert line.endswith("honest")
    assert call("GET", f"{node_url}/state").json()["state"] == "STOPPED"


# ---- peer authentication -------------------------------------------------------------

def control_routes() -> list[tuple[str, str, dict[str, Any] | None]]:
    """Every route of the node, with a body that would do something if it got through."""
    batch = {"public_key": "pk", "block_hash": "0xfeed", "nonces": [1], "dist": [0.5]}
    return [
        ("POST", "pow/init", init_body()),
        ("POST", "pow/init/generate", init_body()),
        ("POST", "pow/init/validate", init_body()),
        ("POST", "pow/phase/generate", None),
        ("POST", "pow/phase/validate", None),
        ("POST", "pow/validate", batch),
        ("GET", "pow/status", None),
        ("GET", "pow/batches?offset=0&limit=10", None),
        ("POST", "pow/stop", None),
        ("POST", "inference/up", {"model": "smollm2"}),
        ("POST", "inference/down", None),
        ("GET", "state", None),
        ("POST", "stop", None),
        ("POST", "train/start", train_body()),
        ("POST", "train/stop", None),
        ("GET", "train/status", None),
    ]


def node_snapshot(base: str) -> tuple[Any, ...]:
    status = pow_status(base)
    batches = call("GET", f"{base}/pow/batches?offset=0&limit=1").json()["total"]
    return call("GET", f"{base}/state").json(), status["status"], batches


def refusal(r: requests.Response) -> tuple[int, str]:
    return r.status_code, r.json().get("reason", "")


def test_every_control_route_refuses_unsigned_unknown_expired_and_replayed_requests(
    node_url: str,
) -> None:
    before = node_snapshot(node_url)
    assert before[0]["state"] == "STOPPED"
    stranger = RequestSigner("stranger", STRANGER_KEY)
    impostor = RequestSigner("validator", STRANGER_KEY)  # a registered id, the wrong key
    jobs_only = RequestSigner("job-client", JOBS_KEY)
    for method, path, body in control_routes():
        url = f"{node_url}/{path}"
        data = b"" if body is None else json.dumps(body).encode()
        where = f"{method} {path}"
        assert refusal(send(method, url, data=data)) == (401, "unsigned"), where
        assert refusal(send(method, url, data=data,
                            headers=stranger.headers(method, url, data))) == (401, "unknown_key"), where
        for skew in (-(MAX_SKEW_S + 5), MAX_SKEW_S + 5):
            stale = SIGNER.headers(method, url, data, timestamp=time.time() + skew)
            assert refusal(send(method, url, data=data, headers=stale)) == (401, "expired"), where
        assert refusal(send(method, url, data=data,
                            headers=impostor.headers(method, url, data))) == (403, "bad_signature"), where
        tampered = data + b" " if data else b"{}"  # still valid JSON, not what was signed
        assert refusal(send(method, url, data=tampered,
                            headers=SIGNER.headers(method, url, data))) == (403, "bad_signature"), where
        assert refusal(send(method, url, data=data,
                            headers=jobs_only.headers(method, url, data))) == (403, "wrong_purpose"), where
    assert node_snapshot(node_url) == before  # nothing refused reached the node


def test_the_training_peer_channel_is_not_a_control_route(node_url: str) -> None:
    """Outer-sync messages are signed by a training run's MLNodes, not by control keys: the
    route takes them without control headers and answers itself (here: no training run)."""
    r = send("POST", f"{node_url}/train/sync", data=b"pseudo-gradient")
    assert r.status_code == 503 and r.json()["reason"] == "not_training"


def test_a_replayed_control_request_is_refused(node_url: str) -> None:
    before = node_snapshot(node_url)
    for method, path, body in control_routes():
        url = f"{node_url}/{path}"
        # bodies the node rejects (422) or routes that change nothing while it is stopped:
        # the first copy passes authentication, the replay must not
        data = b"{}" if body is not None and path in {"pow/init", "pow/init/generate",
                                                      "pow/init/validate", "inference/up",
                                                      "pow/validate", "train/start"} else b""
        headers = SIGNER.headers(method, url, data)
        first = send(method, url, data=data, headers=headers)
        assert first.status_code not in (401, 403), (method, path, first.text)
        assert refusal(send(method, url, data=data, headers=headers)) == (403, "replayed"), path
    assert node_snapshot(node_url) == before
