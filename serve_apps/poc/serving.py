"""The node's logic behind the PoC and control routes: one state machine, no HTTP.

The node runs exactly one of POW, INFERENCE or TRAIN at a time (or nothing: STOPPED).
Starting one while another runs is refused with :class:`StateConflict` (HTTP 409) naming
the call that frees the node; stopping what is not running is a no-op, stopping the other
mode is refused. A training run (:class:`TrainingLauncher`, on Ray Train in
``serve_apps/poc/training.py``) holds the node until it completes, fails or is stopped; its
status and its peers' outer-sync messages stay answered after it ended, until the next run.

A PoC round (:class:`PowSession`) loads its workers in the background (LOADING), then
sits in the requested phase: IDLE, GENERATING (workers stream valid nonces into stored
batches, each also posted to ``{url}/generated``) or VALIDATING (``validate`` recomputes
other nodes' batches; results posted to ``{url}/validated``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cluster.auth.keys import Ed25519Key
from cluster.auth.sync_messages import SyncProblem, SyncRefused
from cluster.core.errors import ErrorCode, TestbenchError
from cluster.poc.protocol import (
    Ack,
    BatchesResponse,
    InferenceStatus,
    InferenceUpRequest,
    NodeState,
    NodeStateResponse,
    PowInitRequest,
    PowPhase,
    PowState,
    PowStatusResponse,
    ProofBatch,
    ValidatedBatch,
)
from cluster.poc.validator import judge
from cluster.train.config import TrainRunConfig
from cluster.train.progress import RunProgress
from serve_apps.poc.callbacks import CallbackQueue, CallbackSender
from serve_apps.poc.config import PocNodeConfig
from serve_apps.poc.deployers import LlmDeployer, LlmEndpoint
from serve_apps.poc.generator import NoncePlan, PowGenerator
from serve_apps.poc.pool import WorkerPool, WorkerPoolFactory
from serve_apps.poc.protocol import TrainStartRequest, TrainStatusResponse
from serve_apps.poc.worker import GeneratedChunk, PowWorkerSpec

log = logging.getLogger(__name__)


class StateConflict(TestbenchError):
    """The call does not fit the node's current state (HTTP 409)."""

    code = ErrorCode.BAD_PARAMS


class Unavailable(TestbenchError):
    """The node is not set up for the call (HTTP 503), e.g. training without a node key."""

    code = ErrorCode.BAD_PARAMS


class BadRequest(TestbenchError):
    """The request is well-formed but does not apply to this round (HTTP 400)."""

    code = ErrorCode.BAD_PARAMS


class TrainingRun(Protocol):
    """One training run of this node, as the service drives it."""

    run: TrainRunConfig

    def done(self) -> bool:
        """The workers have ended (completed, failed or stopped)."""
        ...

    async def status(self) -> RunProgress: ...

    async def receive(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """A peer's outer-sync message: (HTTP status, JSON answer)."""
        ...

    async def stop(self, timeout_s: float) -> None: ...

    async def close(self) -> None: ...


class TrainingLauncher(Protocol):
    def start(self, run: TrainRunConfig, key: Ed25519Key) -> TrainingRun:
        """Start the run in the background (called on the event loop: returns at once)."""
        ...


_LOADED = (PowState.IDLE, PowState.GENERATING, PowState.VALIDATING)
_PHASE_STATE = {"idle": PowState.IDLE, "generate": PowState.GENERATING,
                "validate": PowState.VALIDATING}


class PowSession:
    """One PoC round on this node: workers, the generation loop, batches, callbacks."""

    def __init__(
        self,
        request: PowInitRequest,
        config: PocNodeConfig,
        pool_factory: WorkerPoolFactory,
        callbacks: CallbackQueue,
        phase: PowPhase,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request = request
        self._config = config
        self._pool_factory = pool_factory
        self._callbacks = callbacks
        self._clock = clock
        self._target_phase: PowPhase = phase
        self._validation = config.validation
        if request.fraud_threshold is not None:
            self._validation = self._validation.model_copy(
                update={"p_value_threshold": request.fraud_threshold})
        self.state = PowState.LOADING
        self.last_error: str | None = None
        self._pool: WorkerPool | None = None
        self._batches: deque[ProofBatch] = deque()
        self._batches_dropped = 0
        self._generator: PowGenerator | None = None
        self._gen_task: asyncio.Task[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._phase_lock = asyncio.Lock()
        self.nonces_computed = 0
        self.nonces_valid = 0

    # ---- lifecycle ----------------------------------------------------------------------
    def start_loading(self) -> None:
        self._load_task = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        spec = PowWorkerSpec(round=self.request.round_params(), public_key=self.request.public_key,
                             threads=self._config.threads, device=self._config.device)
        try:
            self._pool = self._pool_factory(spec)  # quick: the slow part is ready()
            digests = await self._pool.ready()
            if len(set(digests)) != 1:
                raise RuntimeError(f"workers built different weights: {sorted(set(digests))}")
            log.info("poc.loaded block_hash=%s workers=%d weights=%s",
                     self.request.block_hash, self._pool.size, digests[0][:16])
            await self._apply_phase(self._target_phase)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the round fails, the node is freed
            await self._fail(f"loading failed: {type(exc).__name__}: {exc}")

    async def set_phase(self, phase: PowPhase) -> None:
        if self.state == PowState.LOADING:
            self._target_phase = phase  # applied when loading ends
            return
        if self.state not in _LOADED:
            raise StateConflict(f"PoW is {self.state}; POST /api/v1/pow/init first")
        await self._apply_phase(phase)

    async def _apply_phase(self, phase: PowPhase) -> None:
        async with self._phase_lock:
            if phase == "generate":
                if self._gen_task is None:
                    self._start_generation()
            else:
                await self._stop_generation()
            self.state = _PHASE_STATE[phase]
            log.info("poc.phase state=%s block_hash=%s", self.state, self.request.block_hash)

    def _start_generation(self) -> None:
        assert self._pool is not None
        req = self.request
        plan = NoncePlan(chunk_size=req.batch_size * self._config.batches_per_chunk,
                         stride=req.node_count, offset=req.node_id)
        resume_at = 0
        if self._generator is not None:  # resume after the last chunk handed out
            self.nonces_computed += self._generator.nonces_computed
            self.nonces_valid += self._generator.nonces_valid
            resume_at = self._generator.next_chunk
        self._generator = PowGenerator(self._pool, plan, self._store, self._config.chunks_in_flight,
                                       clock=self._clock, first_chunk=resume_at)
        self._gen_task = asyncio.ensure_future(self._generator.run())
        self._gen_task.add_done_callback(self._generation_ended)

    def _generation_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self._gen_task = None
        asyncio.ensure_future(self._fail(f"generation failed: {type(exc).__name__}: {exc}"))

    async def _stop_generation(self) -> None:
        """Let the chunks in flight finish and be stored (a few seconds at most), then stop."""
        task, self._gen_task = self._gen_task, None
        if task is None:
            return
        if self._generator is not None:
            self._generator.request_stop()
        done, _ = await asyncio.wait([task], timeout=self._config.drain_timeout_s)
        if not done:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _fail(self, message: str) -> None:
        self.last_error = message
        log.error("poc.failed block_hash=%s error=%s", self.request.block_hash, message)
        await self.close()

    async def close(self) -> None:
        """Stop generation, kill the workers, flush callbacks; the batches stay readable."""
        load = self._load_task
        if load is not None and load is not asyncio.current_task() and not load.done():
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
        await self._stop_generation()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        await self._callbacks.close(flush_timeout_s=self._config.callback_timeout_s)
        self.state = PowState.STOPPED

    # ---- batches ------------------------------------------------------------------------
    def _store(self, result: GeneratedChunk) -> None:
        if not result.nonces:
            return
        req = self.request
        batch = ProofBatch(public_key=req.public_key, block_hash=req.block_hash,
                           block_height=req.block_height, nonces=result.nonces,
                           dist=result.distances, node_id=req.node_id)
        self._batches.append(batch)
        if len(self._batches) > self._config.max_stored_batches:
            self._batches.popleft()
            self._batches_dropped += 1
        if req.url is not None:
            self._callbacks.put(_join(str(req.url), "generated"), batch.model_dump(mode="json"))

    def batches(self, offset: int, limit: int) -> BatchesResponse:
        total = self._batches_dropped + len(self._batches)
        start = max(offset, self._batches_dropped)
        end = min(total, start + limit)
        items = [self._batches[i - self._batches_dropped] for i in range(start, end)]
        return BatchesResponse(batches=items, offset=start, next_offset=max(end, start), total=total)

    # ---- validation phase ----------------------------------------------------------------
    async def validate(self, batch: ProofBatch) -> ValidatedBatch:
        if self.state != PowState.VALIDATING or self._pool is None:
            raise StateConflict(
                f"PoW is {self.state}, not VALIDATING: POST /api/v1/pow/phase/validate "
                "(or /api/v1/pow/init/validate) first")
        if batch.block_hash != self.request.block_hash:
            raise BadRequest(f"batch is for block_hash {batch.block_hash!r} but this node "
                             f"validates {self.request.block_hash!r}")
        pool = self._pool
        parts = _split(batch.nonces, pool.size)
        results = await asyncio.gather(*(
            pool.distances(w, batch.public_key, part) for w, part in enumerate(parts) if part))
        received = [d for part in results for d in part]
        r_target = self.request.r_target
        verdict = judge(batch.nonces, batch.dist, received, r_target, self._validation)
        validated = ValidatedBatch(
            **batch.model_dump(), received_dist=received, r_target=r_target,
            fraud_threshold=self._validation.p_value_threshold,
            n_invalid=len(verdict.mismatches), probability_honest=verdict.p_value,
            fraud_detected=verdict.fraud)
        if self.request.url is not None:
            self._callbacks.put(_join(str(self.request.url), "validated"),
                                validated.model_dump(mode="json"))
        return validated

    # ---- status -------------------------------------------------------------------------
    def status(self, node_state: NodeState) -> PowStatusResponse:
        gen = self._generator
        req = self.request
        return PowStatusResponse(
            status=self.state, node_state=node_state,
            is_model_initialized=self.state in _LOADED,
            block_hash=req.block_hash, block_height=req.block_height,
            public_key=req.public_key, r_target=req.r_target,
            workers=self._pool.size if self._pool is not None else 0,
            nonces_computed=self.nonces_computed + (gen.nonces_computed if gen else 0),
            nonces_valid=self.nonces_valid + (gen.nonces_valid if gen else 0),
            batches=self._batches_dropped + len(self._batches),
            nonces_per_s=gen.nonces_per_s() if gen and self._gen_task else 0.0,
            callbacks_sent=self._callbacks.sent, callback_errors=self._callbacks.errors,
            last_error=self.last_error or self._callbacks.last_error,
        )


def _join(base: str, leaf: str) -> str:
    return f"{base.rstrip('/')}/{leaf}"


def _split(items: list[int], parts: int) -> list[list[int]]:
    size = -(-len(items) // parts) if items else 0
    return [items[i * size:(i + 1) * size] for i in range(parts)] if size else []


class PocNodeService:
    """The node control state machine: POW, INFERENCE, TRAIN or STOPPED."""

    def __init__(
        self,
        config: PocNodeConfig,
        pool_factory: WorkerPoolFactory,
        deployer: LlmDeployer,
        sender: CallbackSender,
        clock: Callable[[], float] = time.monotonic,
        trainer: TrainingLauncher | None = None,
    ) -> None:
        self._config = config
        self._pool_factory = pool_factory
        self._deployer = deployer
        self._sender = sender
        self._clock = clock
        self._trainer = trainer
        self._node_key = config.training.node_key()
        self._train: TrainingRun | None = None
        self._mode = NodeState.STOPPED
        self._pow: PowSession | None = None
        self._inference: InferenceStatus | None = None
        self._endpoint: LlmEndpoint | None = None
        self._deploy_task: asyncio.Task[None] | None = None
        self._lock_obj: asyncio.Lock | None = None

    @property
    def _lock(self) -> asyncio.Lock:
        if self._lock_obj is None:  # created on the serving loop, not at construction
            self._lock_obj = asyncio.Lock()
        return self._lock_obj

    @property
    def mode(self) -> NodeState:
        """The running mode; a PoC round that failed or stopped frees the node."""
        if self._mode == NodeState.POW and (self._pow is None or self._pow.state == PowState.STOPPED):
            self._mode = NodeState.STOPPED
        if self._mode == NodeState.TRAIN and (self._train is None or self._train.done()):
            self._mode = NodeState.STOPPED
        return self._mode

    def _refuse_unless_free(self, wanted: str) -> None:
        mode = self.mode
        if mode == NodeState.POW:
            raise StateConflict(f"cannot start {wanted}: the node runs POW "
                                "(POST /api/v1/pow/stop first)")
        if mode == NodeState.INFERENCE:
            model = self._inference.model if self._inference else "?"
            raise StateConflict(f"cannot start {wanted}: the node runs INFERENCE of {model!r} "
                                "(POST /api/v1/inference/down first)")
        if mode == NodeState.TRAIN:
            run = self._train.run.run_id if self._train else "?"
            raise StateConflict(f"cannot start {wanted}: the node runs TRAIN (training run "
                                f"{run!r}; POST /api/v1/train/stop first)")

    # ---- PoW ----------------------------------------------------------------------------
    async def pow_init(self, request: PowInitRequest, phase: PowPhase) -> Ack:
        async with self._lock:
            if self.mode == NodeState.POW:
                assert self._pow is not None
                raise StateConflict(
                    f"PoW is already initialised for block_hash {self._pow.request.block_hash!r} "
                    f"({self._pow.state}): switch with /api/v1/pow/phase/{{generate,validate}} "
                    "or POST /api/v1/pow/stop first")
            self._refuse_unless_free("POW")
            session = PowSession(request, self._config, self._pool_factory,
                                 CallbackQueue(self._sender), phase, self._clock)
            self._pow = session
            self._mode = NodeState.POW
            session.start_loading()
            return Ack(message=f"PoW loading for block_hash {request.block_hash!r}, then {phase}",
                       state=self._mode)

    async def pow_phase(self, phase: PowPhase) -> Ack:
        async with self._lock:
            if self.mode != NodeState.POW or self._pow is None:
                raise StateConflict(f"PoW is not running (node is {self.mode}): "
                                    "POST /api/v1/pow/init first")
            await self._pow.set_phase(phase)
            return Ack(message=f"PoW phase {phase}", state=self.mode)

    async def pow_validate(self, batch: ProofBatch) -> ValidatedBatch:
        if self.mode != NodeState.POW or self._pow is None:
            raise StateConflict(f"PoW is not running (node is {self.mode}): "
                                "POST /api/v1/pow/init/validate first")
        return await self._pow.validate(batch)

    def pow_status(self) -> PowStatusResponse:
        mode = self.mode
        if self._pow is None:
            return PowStatusResponse(status=PowState.STOPPED, node_state=mode,
                                     is_model_initialized=False)
        return self._pow.status(mode)

    def pow_batches(self, offset: int, limit: int) -> BatchesResponse:
        if self._pow is None:
            return BatchesResponse(batches=[], offset=offset, next_offset=offset, total=0)
        return self._pow.batches(offset, limit)

    async def pow_stop(self) -> Ack:
        async with self._lock:
            mode = self.mode
            if mode == NodeState.INFERENCE:
                raise StateConflict("PoW is not running: the node runs INFERENCE "
                                    "(POST /api/v1/inference/down to stop it)")
            if mode == NodeState.TRAIN:
                raise StateConflict("PoW is not running: the node runs TRAIN "
                                    "(POST /api/v1/train/stop to stop it)")
            if mode == NodeState.STOPPED:
                return Ack(message="PoW was not running", state=mode)
            assert self._pow is not None
            await self._pow.close()
            self._mode = NodeState.STOPPED
            return Ack(message="PoW stopped", state=self._mode)

    # ---- inference ----------------------------------------------------------------------
    async def inference_up(self, request: InferenceUpRequest) -> Ack:
        async with self._lock:
            self._refuse_unless_free("INFERENCE")
            self._mode = NodeState.INFERENCE
            self._inference = InferenceStatus(model=request.model, status="deploying")
            self._endpoint = None
            self._deploy_task = asyncio.ensure_future(self._deploy(request))
            return Ack(message=f"deploying {request.model!r}", state=self._mode)

    async def _deploy(self, request: InferenceUpRequest) -> None:
        try:
            endpoint = await self._deployer.deploy(request.model, dict(request.config))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported in /api/v1/state, node freed
            self._inference = InferenceStatus(model=request.model, status="failed",
                                              error=f"{type(exc).__name__}: {exc}")
            self._mode = NodeState.STOPPED
            log.error("poc.inference.failed model=%s error=%s", request.model, exc)
            return
        self._endpoint = endpoint
        self._inference = InferenceStatus(model=endpoint.model, status="running",
                                          app_name=endpoint.app_name,
                                          route_prefix=endpoint.route_prefix)

    async def inference_down(self) -> Ack:
        async with self._lock:
            mode = self.mode
            if mode == NodeState.POW:
                raise StateConflict("inference is not running: the node runs POW "
                                    "(POST /api/v1/pow/stop to stop it)")
            if mode == NodeState.TRAIN:
                raise StateConflict("inference is not running: the node runs TRAIN "
                                    "(POST /api/v1/train/stop to stop it)")
            if mode == NodeState.STOPPED:
                return Ack(message="inference was not running", state=mode)
            await self._teardown_inference()
            return Ack(message="inference stopped", state=self._mode)

    async def _teardown_inference(self) -> None:
        if self._deploy_task is not None:
            await asyncio.gather(self._deploy_task, return_exceptions=True)
            self._deploy_task = None
        if self._endpoint is not None:
            await self._deployer.teardown(self._endpoint)
            self._endpoint = None
        self._inference = None
        self._mode = NodeState.STOPPED

    # ---- node ---------------------------------------------------------------------------
    def state(self) -> NodeStateResponse:
        mode = self.mode
        pow_state = self._pow.state if self._pow is not None else PowState.STOPPED
        return NodeStateResponse(state=mode, pow=pow_state, inference=self._inference)

    async def stop(self) -> Ack:
        """Stop whatever runs."""
        mode = self.mode
        if mode == NodeState.POW:
            return await self.pow_stop()
        if mode == NodeState.INFERENCE:
            return await self.inference_down()
        if mode == NodeState.TRAIN:
            return await self.train_stop()
        return Ack(message="nothing was running", state=mode)

    # ---- training -----------------------------------------------------------------------
    @property
    def max_sync_bytes(self) -> int:
        return self._config.training.max_message_bytes

    @property
    def node_public_key(self) -> str | None:
        return self._node_key.public_key if self._node_key is not None else None

    def _check_run(self, run: TrainRunConfig) -> None:
        training = self._config.training
        if self._trainer is None or self._node_key is None:
            raise Unavailable("this node cannot train: it has no training key "
                              "(training.node_key_file or training.node_key_hex in its config)")
        if any(p.public_key == self._node_key.public_key for p in run.peers):
            raise BadRequest("peers lists this node's own key "
                             f"{self._node_key.public_key[:16]}...: list only the other nodes")
        if training.output_root is not None:
            root = training.output_root.resolve()
            if not run.output_path.resolve().is_relative_to(root):
                raise BadRequest(f"output_dir {run.output_dir!r} is not inside this node's "
                                 f"training.output_root {str(root)!r}")

    async def train_start(self, request: TrainStartRequest) -> Ack:
        run = TrainRunConfig.model_validate(request.model_dump())
        async with self._lock:
            if self.mode == NodeState.TRAIN:
                current = self._train.run.run_id if self._train else "?"
                raise StateConflict(f"training run {current!r} is running: POST "
                                    "/api/v1/train/stop first")
            self._refuse_unless_free("TRAIN")
            self._check_run(run)
            assert self._trainer is not None and self._node_key is not None
            if self._train is not None:  # the last run's coordinator: its status goes
                await self._train.close()
                self._train = None
            self._train = self._trainer.start(run, self._node_key)
            self._mode = NodeState.TRAIN
            resumes = (run.checkpoint_root / run.run_id).is_dir()
            return Ack(message=f"training run {run.run_id!r} starting"
                       + (" (resuming from its output_dir)" if resumes else ""), state=self._mode)

    async def train_stop(self) -> Ack:
        """Stop the training run (idempotent): workers leave at their next inner step, the
        last outer step's checkpoint stands."""
        async with self._lock:
            mode = self.mode
            if mode == NodeState.POW:
                raise StateConflict("training is not running: the node runs POW "
                                    "(POST /api/v1/pow/stop to stop it)")
            if mode == NodeState.INFERENCE:
                raise StateConflict("training is not running: the node runs INFERENCE "
                                    "(POST /api/v1/inference/down to stop it)")
            if mode == NodeState.STOPPED or self._train is None:
                return Ack(message="training was not running", state=mode)
            await self._train.stop(self._config.training.stop_timeout_s)
            run_id = self._train.run.run_id
            if not self._train.done():
                return Ack(message=f"training run {run_id!r} is stopping (workers still "
                           f"busy after {self._config.training.stop_timeout_s:g} s)",
                           state=self.mode)
            return Ack(message=f"training run {run_id!r} stopped", state=self.mode)

    async def train_status(self) -> TrainStatusResponse:
        run = await self._train.status() if self._train is not None else None
        return TrainStatusResponse(node_state=self.mode, node_public_key=self.node_public_key,
                                   run=run)

    async def train_sync(self, headers: Mapping[str, str],
                         body: bytes) -> tuple[int, dict[str, Any]]:
        """A peer's outer-sync message for this node's training run."""
        if self._train is None:
            refused = SyncRefused(SyncProblem.NOT_TRAINING, "this node has no training run")
            return refused.status, refused.body()
        return await self._train.receive(headers, body)

    async def shutdown(self) -> None:
        """Release workers and the LLM app (replica shutdown)."""
        if self._pow is not None:
            await self._pow.close()
        if self._mode == NodeState.INFERENCE:
            await self._teardown_inference()
        if self._train is not None:
            await self._train.close()
            self._train = None
        await self._sender.close()
