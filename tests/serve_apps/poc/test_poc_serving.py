"""The node's state machine, PoC rounds and the training runs' place in it, in-process (no
Ray, no HTTP)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from cluster.auth.keys import Ed25519Key
from cluster.poc.compute import PocComputer, configure_torch
from cluster.poc.config import PocModelParams
from cluster.poc.protocol import (
    InferenceUpRequest,
    NodeState,
    PowInitRequest,
    PowState,
    ProofBatch,
)
from cluster.train.config import TrainRunConfig
from cluster.train.progress import RunProgress, TrainState
from serve_apps.poc.config import PocNodeConfig
from serve_apps.poc.deployers import LlmEndpoint
from serve_apps.poc.pool import LocalWorkerPool
from serve_apps.poc.protocol import TrainStartRequest
from serve_apps.poc.serving import BadRequest, PocNodeService, StateConflict, Unavailable
from serve_apps.poc.worker import GeneratedChunk, NonceChunk, PowWorkerSpec

pytestmark = pytest.mark.usefixtures("torch_settings_restored")

MODEL = PocModelParams(dim=32, n_layers=1, n_heads=4, vocab_size=512, seq_len=8, out_dim=32)


class FakeDeployer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.deployed: list[tuple[str, dict[str, Any]]] = []
        self.torn_down: list[LlmEndpoint] = []

    async def deploy(self, model: str, config: dict[str, Any]) -> LlmEndpoint:
        if self.fail:
            raise RuntimeError("no GPU for you")
        self.deployed.append((model, config))
        return LlmEndpoint(model=model, app_name="llm-fake", route_prefix="/llm-fake")

    async def teardown(self, endpoint: LlmEndpoint) -> None:
        self.torn_down.append(endpoint)


class RecordingSender:
    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []

    async def post(self, url: str, payload: dict[str, Any]) -> None:
        self.posts.append((url, payload))

    async def close(self) -> None:
        pass


class UnloadablePool(LocalWorkerPool):
    async def ready(self) -> list[str]:
        raise RuntimeError("out of memory")


class BrokenPool(LocalWorkerPool):
    async def generate(self, worker: int, chunk: NonceChunk) -> GeneratedChunk:
        raise RuntimeError("worker died")


def init_request(**kw: Any) -> PowInitRequest:
    base: dict[str, Any] = {"block_hash": "block-1", "public_key": "node-key", "r_target": 1.36,
                            "batch_size": 32, "params": MODEL.model_dump(), "node_id": 1,
                            "node_count": 3, "url": "http://callback.test/poc"}
    return PowInitRequest.model_validate({**base, **kw})


def make_service(deployer: FakeDeployer | None = None, pool: type[LocalWorkerPool] = LocalWorkerPool
                 ) -> tuple[PocNodeService, RecordingSender]:
    configure_torch(1)
    sender = RecordingSender()
    config = PocNodeConfig(workers=2, batches_per_chunk=2, callback_timeout_s=2.0)

    def factory(spec: PowWorkerSpec) -> LocalWorkerPool:
        return pool(spec, config.workers)

    return PocNodeService(config, factory, deployer or FakeDeployer(), sender), sender


async def wait_for(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_generation_stores_valid_batches_and_posts_them() -> None:
    service, sender = make_service()
    assert service.state().state == NodeState.STOPPED
    ack = await service.pow_init(init_request(), "generate")
    assert ack.state == NodeState.POW
    await wait_for(lambda: service.pow_status().batches >= 3)
    status = service.pow_status()
    assert status.status == PowState.GENERATING and status.is_model_initialized
    assert status.workers == 2 and status.nonces_valid > 0
    await service.pow_stop()
    assert service.state().state == NodeState.STOPPED
    status = service.pow_status()
    assert status.status == PowState.STOPPED and status.workers == 0

    got = service.pow_batches(0, 10_000)
    assert got.total == len(got.batches) == status.batches
    nonces = [n for b in got.batches for n in b.nonces]
    dists = [d for b in got.batches for d in b.dist]
    assert len(set(nonces)) == len(nonces) == status.nonces_valid
    assert all(n % 3 == 1 for n in nonces)  # node 1 of 3 owns nonces 1, 4, 7, ...
    check = PocComputer(init_request().round_params(), "node-key")
    assert check.compute_distances(nonces).tolist() == dists
    assert all(d < 1.36 for d in dists)
    # every stored batch was posted, in order, to {url}/generated
    assert [u for u, _ in sender.posts] == ["http://callback.test/poc/generated"] * got.total
    assert [p for _, p in sender.posts] == [b.model_dump(mode="json") for b in got.batches]
    assert (await service.pow_stop()).message == "PoW was not running"


async def test_one_mode_at_a_time_with_clear_refusals() -> None:
    deployer = FakeDeployer()
    service, _ = make_service(deployer)
    await service.pow_init(init_request(), "idle")
    with pytest.raises(StateConflict, match="already initialised"):
        await service.pow_init(init_request(), "generate")
    with pytest.raises(StateConflict, match=r"runs POW \(POST /api/v1/pow/stop first\)"):
        await service.inference_up(InferenceUpRequest(model="m"))
    with pytest.raises(StateConflict, match="runs POW"):
        await service.inference_down()
    await wait_for(lambda: service.pow_status().status == PowState.IDLE)
    await service.pow_stop()

    await service.inference_up(InferenceUpRequest(model="smollm2", config={"max_len": 512}))
    await wait_for(lambda: service.state().inference.status == "running")  # type: ignore[union-attr]
    state = service.state()
    assert state.state == NodeState.INFERENCE and state.pow == PowState.STOPPED
    assert deployer.deployed == [("smollm2", {"max_len": 512})]
    with pytest.raises(StateConflict, match="runs INFERENCE of 'smollm2'"):
        await service.pow_init(init_request(), "generate")
    with pytest.raises(StateConflict, match="inference/down"):
        await service.pow_stop()
    with pytest.raises(StateConflict, match="POST /api/v1/pow/init first"):
        await service.pow_phase("generate")
    await service.inference_down()
    assert service.state().state == NodeState.STOPPED and service.state().inference is None
    assert [e.app_name for e in deployer.torn_down] == ["llm-fake"]
    assert (await service.stop()).message == "nothing was running"


async def test_validation_phase_recomputes_other_nodes_batches() -> None:
    service, sender = make_service()
    await service.pow_init(init_request(fraud_threshold=1e-3), "validate")
    await wait_for(lambda: service.pow_status().status == PowState.VALIDATING)
    other = PocComputer(init_request().round_params(), "other-key")
    nonces, dist = other.find_valid(range(300))
    batch = ProofBatch(public_key="other-key", block_hash="block-1", nonces=nonces, dist=dist)
    ok = await service.pow_validate(batch)
    assert ok.received_dist == dist and ok.n_invalid == 0 and not ok.fraud_detected
    assert ok.fraud_threshold == 1e-3
    forged = batch.model_copy(update={"dist": [d - 1e-3 for d in dist]})
    bad = await service.pow_validate(forged)
    assert bad.n_invalid == len(nonces) and bad.fraud_detected and bad.probability_honest < 1e-3
    with pytest.raises(BadRequest, match="block_hash"):
        await service.pow_validate(batch.model_copy(update={"block_hash": "block-0"}))
    await wait_for(lambda: len(sender.posts) == 2)  # posted off the request path
    assert [u.rsplit("/", 1)[1] for u, _ in sender.posts] == ["validated", "validated"]

    await service.pow_phase("generate")  # switch phases without re-loading
    await wait_for(lambda: service.pow_status().nonces_computed > 0)
    with pytest.raises(StateConflict, match="not VALIDATING"):
        await service.pow_validate(batch)
    await service.stop()
    assert service.state().state == NodeState.STOPPED


async def test_failures_free_the_node_and_are_reported() -> None:
    service, _ = make_service(FakeDeployer(fail=True))
    await service.inference_up(InferenceUpRequest(model="big"))
    await wait_for(lambda: service.state().state == NodeState.STOPPED)
    inference = service.state().inference
    assert inference is not None and inference.status == "failed"
    assert "no GPU for you" in (inference.error or "")

    broken, _ = make_service(pool=BrokenPool)
    await broken.pow_init(init_request(), "generate")
    await wait_for(lambda: broken.state().state == NodeState.STOPPED)
    status = broken.pow_status()
    assert status.status == PowState.STOPPED
    assert "generation failed: RuntimeError: worker died" in (status.last_error or "")
    await broken.pow_init(init_request(), "idle")  # the node can start a new round
    await broken.stop()

    unloadable, _ = make_service(pool=UnloadablePool)
    await unloadable.pow_init(init_request(), "generate")
    await wait_for(lambda: unloadable.state().state == NodeState.STOPPED)
    assert "loading failed: RuntimeError: out of memory" in (unloadable.pow_status().last_error or "")


class SlowPool(LocalWorkerPool):
    closed = 0

    async def ready(self) -> list[str]:
        await asyncio.sleep(60)
        return await super().ready()

    async def close(self) -> None:
        SlowPool.closed += 1
        await super().close()


async def test_stop_while_loading_releases_the_workers_at_once() -> None:
    service, _ = make_service(pool=SlowPool)
    await service.pow_init(init_request(), "generate")
    await asyncio.sleep(0.05)
    assert service.pow_status().status == PowState.LOADING
    await service.pow_phase("validate")  # remembered for when loading ends
    started = time.monotonic()
    await service.pow_stop()
    assert time.monotonic() - started < 5
    assert SlowPool.closed == 1 and service.state().state == NodeState.STOPPED


async def test_old_batches_are_dropped_beyond_the_cap_and_paging_skips_them() -> None:
    configure_torch(1)
    sender = RecordingSender()
    config = PocNodeConfig(workers=1, batches_per_chunk=1, max_stored_batches=3)
    service = PocNodeService(config, lambda spec: LocalWorkerPool(spec, 1), FakeDeployer(), sender)
    await service.pow_init(init_request(url=None), "generate")
    await wait_for(lambda: service.pow_status().batches >= 6)
    await service.pow_stop()
    total = service.pow_status().batches
    page = service.pow_batches(0, 2)
    assert page.total == total and page.offset == total - 3 and len(page.batches) == 2
    rest = service.pow_batches(page.next_offset, 100)
    assert len(rest.batches) == 1 and rest.next_offset == total
    assert sender.posts == []  # no url, no callbacks


async def test_real_deployer_builds_the_llm_app_for_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    from serve_apps.poc import deployers

    built: list[dict[str, Any]] = []
    runs: list[tuple[Any, dict[str, Any]]] = []
    deleted: list[str] = []
    monkeypatch.setattr(deployers, "load_object", lambda path: lambda cfg: built.append(cfg) or "app")
    monkeypatch.setattr(serve, "run", lambda app, **kw: runs.append((app, kw)))
    monkeypatch.setattr(serve, "delete", lambda name: deleted.append(name))
    deployer = deployers.ServeLlmDeployer(app_name="llm-x", route_prefix="/x")
    endpoint = await deployer.deploy("smollm2", {"model_source": "/models/smollm2", "device": "cpu"})
    assert built == [{"model_id": "smollm2", "model_source": "/models/smollm2", "device": "cpu"}]
    assert runs == [("app", {"name": "llm-x", "route_prefix": "/x"})]
    assert endpoint == LlmEndpoint(model="smollm2", app_name="llm-x", route_prefix="/x")
    await deployer.teardown(endpoint)
    assert deleted == ["llm-x"]


async def test_missing_llm_builder_is_a_clear_deploy_error() -> None:
    from serve_apps.poc.deployers import DeployError, ServeLlmDeployer

    deployer = ServeLlmDeployer(builder="serve_apps.no_such_app:build")
    with pytest.raises(DeployError, match="serve_apps.no_such_app:build is not available"):
        await deployer.deploy("m", {})


# ---- training: the same one-service rule, with a launcher that runs nothing ----------------
NODE_KEY = Ed25519Key(bytes([9]) * 32)


class FakeRun:
    def __init__(self, run: TrainRunConfig) -> None:
        self.run = run
        self.finished = False
        self.stops: list[float] = []
        self.closed = False
        self.messages: list[bytes] = []

    def done(self) -> bool:
        return self.finished

    async def status(self) -> RunProgress:
        return RunProgress(run_id=self.run.run_id, node_public_key=NODE_KEY.public_key,
                           outer_steps=1, inner_steps=1, started_at=0.0, updated_at=0.0,
                           state=TrainState.STOPPED if self.finished else TrainState.RUNNING)

    async def receive(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        self.messages.append(body)
        return 200, {"status": "accepted"}

    async def stop(self, timeout_s: float) -> None:
        self.stops.append(timeout_s)
        self.finished = True

    async def close(self) -> None:
        self.closed = True


class FakeLauncher:
    def __init__(self) -> None:
        self.runs: list[FakeRun] = []

    def start(self, run: TrainRunConfig, key: Ed25519Key) -> FakeRun:
        assert key.public_key == NODE_KEY.public_key
        self.runs.append(FakeRun(run))
        return self.runs[-1]


def train_request(tmp: str = "/tmp/out", **kw: Any) -> TrainStartRequest:
    return TrainStartRequest.model_validate({
        "run_id": "r1", "model": "m", "dataset": {"files": ["d.jsonl"]}, "output_dir": tmp, **kw})


def training_service(deployer: FakeDeployer | None = None, **training: Any
                     ) -> tuple[PocNodeService, FakeLauncher]:
    configure_torch(1)
    config = PocNodeConfig(workers=1, batches_per_chunk=2, training={
        "node_key_hex": NODE_KEY.seed_hex, **training})
    launcher = FakeLauncher()
    service = PocNodeService(config, lambda spec: LocalWorkerPool(spec, 1),
                             deployer or FakeDeployer(), RecordingSender(), trainer=launcher)
    return service, launcher


async def test_training_takes_the_node_only_when_it_is_free_and_stops_idempotently() -> None:
    service, launcher = training_service()
    status = await service.train_status()
    assert status.node_state == NodeState.STOPPED and status.run is None
    assert status.node_public_key == NODE_KEY.public_key
    assert (await service.train_stop()).message == "training was not running"
    assert await service.train_sync({}, b"x") == (
        503, {"detail": "this node has no training run", "reason": "not_training"})

    await service.pow_init(init_request(), "idle")
    with pytest.raises(StateConflict, match=r"runs POW \(POST /api/v1/pow/stop first\)"):
        await service.train_start(train_request())
    with pytest.raises(StateConflict, match="training is not running: the node runs POW"):
        await service.train_stop()
    await wait_for(lambda: service.pow_status().status == PowState.IDLE)
    await service.pow_stop()
    await service.inference_up(InferenceUpRequest(model="smollm2"))
    with pytest.raises(StateConflict, match=r"runs INFERENCE of 'smollm2' \(POST "
                                            r"/api/v1/inference/down first\)"):
        await service.train_start(train_request())
    await service.inference_down()
    assert launcher.runs == []

    ack = await service.train_start(train_request())
    assert ack.state == NodeState.TRAIN and ack.message == "training run 'r1' starting"
    with pytest.raises(StateConflict, match=r"runs TRAIN \(training run 'r1'; POST "
                                            r"/api/v1/train/stop first\)"):
        await service.pow_init(init_request(), "generate")
    with pytest.raises(StateConflict, match="runs TRAIN"):
        await service.inference_up(InferenceUpRequest(model="m"))
    with pytest.raises(StateConflict, match="training run 'r1' is running"):
        await service.train_start(train_request())
    with pytest.raises(StateConflict, match="PoW is not running: the node runs TRAIN"):
        await service.pow_stop()
    with pytest.raises(StateConflict, match="inference is not running: the node runs TRAIN"):
        await service.inference_down()
    assert await service.train_sync({}, b"m") == (200, {"status": "accepted"})
    assert (await service.train_status()).run.state == TrainState.RUNNING  # type: ignore[union-attr]

    ack = await service.train_stop()
    assert ack.message == "training run 'r1' stopped" and ack.state == NodeState.STOPPED
    assert launcher.runs[0].stops == [120.0]
    assert (await service.train_stop()).message == "training was not running"
    # the ended run still answers status (and its peers) until the next run replaces it
    assert (await service.train_status()).run.state == TrainState.STOPPED  # type: ignore[union-attr]
    await service.train_start(train_request(run_id="r2"))
    assert launcher.runs[0].closed and service.state().state == NodeState.TRAIN
    launcher.runs[1].finished = True  # the workers completed: the node is free again
    assert service.state().state == NodeState.STOPPED
    await service.inference_up(InferenceUpRequest(model="m"))
    await service.stop()


async def test_a_node_trains_only_with_its_key_other_nodes_as_peers_and_its_output_root(
    tmp_path: Any,
) -> None:
    config = PocNodeConfig(workers=1)
    bare = PocNodeService(config, lambda spec: LocalWorkerPool(spec, 1), FakeDeployer(),
                          RecordingSender(), trainer=FakeLauncher())
    with pytest.raises(Unavailable, match="no training key"):
        await bare.train_start(train_request())
    service, launcher = training_service(output_root=str(tmp_path / "runs"))
    own = [{"public_key": NODE_KEY.public_key, "url": "http://me"}]
    with pytest.raises(BadRequest, match="peers lists this node's own key"):
        await service.train_start(train_request(str(tmp_path / "runs" / "a"), peers=own))
    with pytest.raises(BadRequest, match="not inside this node's training.output_root"):
        await service.train_start(train_request(str(tmp_path / "elsewhere")))
    await service.train_start(train_request(str(tmp_path / "runs" / "a")))
    assert [r.run.output_dir for r in launcher.runs] == [str(tmp_path / "runs" / "a")]
