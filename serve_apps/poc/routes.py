"""Thin FastAPI handlers: wire models in, the service's answer out, errors to HTTP codes."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from cluster.auth.sync_messages import SyncProblem, SyncRefused
from cluster.core.settings import AuthSettings
from cluster.poc.protocol import (
    Ack,
    BatchesResponse,
    InferenceUpRequest,
    NodeStateResponse,
    PowInitRequest,
    PowStatusResponse,
    ProofBatch,
    ValidatedBatch,
)
from serve_apps.common.peer_auth import install_peer_auth
from serve_apps.poc.protocol import TrainStartRequest, TrainStatusResponse
from serve_apps.poc.serving import BadRequest, PocNodeService, StateConflict, Unavailable

API_PREFIX = "/api/v1"
# Peers' outer-sync messages carry their own signature (cluster/auth/sync_messages.py),
# checked against the keys registered for the training run, not the control keys.
SYNC_PATH = f"{API_PREFIX}/train/sync"

_STATUS = {StateConflict: 409, Unavailable: 503, BadRequest: 400}


def create_api(service: PocNodeService, auth: AuthSettings | None = None) -> FastAPI:
    """The node's routes; with ``auth`` active every route takes only requests signed by a
    key registered for the "control" purpose (a refused one never reaches the service),
    except the training run's peer channel (``SYNC_PATH``), whose messages are signed by
    the run's registered MLNodes."""
    app = FastAPI(title="testbench MLNode", version="1")
    install_peer_auth(app, auth or AuthSettings(), purpose="control", exempt_paths=[SYNC_PATH])

    async def _error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=_STATUS[type(exc)], content={"detail": str(exc)})

    for exc_type in _STATUS:
        app.add_exception_handler(exc_type, _error)

    r = APIRouter(prefix=API_PREFIX)

    # ---- proof of compute ---------------------------------------------------------------
    @r.post("/pow/init")
    async def pow_init(req: PowInitRequest) -> Ack:
        return await service.pow_init(req, "idle")

    @r.post("/pow/init/generate")
    async def pow_init_generate(req: PowInitRequest) -> Ack:
        return await service.pow_init(req, "generate")

    @r.post("/pow/init/validate")
    async def pow_init_validate(req: PowInitRequest) -> Ack:
        return await service.pow_init(req, "validate")

    @r.post("/pow/phase/generate")
    async def pow_phase_generate() -> Ack:
        return await service.pow_phase("generate")

    @r.post("/pow/phase/validate")
    async def pow_phase_validate() -> Ack:
        return await service.pow_phase("validate")

    @r.post("/pow/validate")
    async def pow_validate(batch: ProofBatch) -> ValidatedBatch:
        return await service.pow_validate(batch)

    @r.get("/pow/status")
    async def pow_status() -> PowStatusResponse:
        return service.pow_status()

    @r.get("/pow/batches")
    async def pow_batches(offset: int = Query(0, ge=0),
                          limit: int = Query(1000, ge=1, le=100_000)) -> BatchesResponse:
        return service.pow_batches(offset, limit)

    @r.post("/pow/stop")
    async def pow_stop() -> Ack:
        return await service.pow_stop()

    # ---- node control -------------------------------------------------------------------
    @r.post("/inference/up")
    async def inference_up(req: InferenceUpRequest) -> Ack:
        return await service.inference_up(req)

    @r.post("/inference/down")
    async def inference_down() -> Ack:
        return await service.inference_down()

    @r.get("/state")
    async def state() -> NodeStateResponse:
        return service.state()

    @r.post("/stop")
    async def stop() -> Ack:
        return await service.stop()

    # ---- training -----------------------------------------------------------------------
    @r.post("/train/start")
    async def train_start(req: TrainStartRequest) -> Ack:
        return await service.train_start(req)

    @r.post("/train/stop")
    async def train_stop() -> Ack:
        return await service.train_stop()

    @r.get("/train/status")
    async def train_status() -> TrainStatusResponse:
        return await service.train_status()

    @r.post("/train/sync")
    async def train_sync(request: Request) -> JSONResponse:
        limit = service.max_sync_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            refused = SyncRefused(SyncProblem.TOO_LARGE, f"the body is over {limit} bytes")
            return JSONResponse(status_code=refused.status, content=refused.body())
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                refused = SyncRefused(SyncProblem.TOO_LARGE, f"the body is over {limit} bytes")
                return JSONResponse(status_code=refused.status, content=refused.body())
            chunks.append(chunk)
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, content = await service.train_sync(headers, b"".join(chunks))
        return JSONResponse(status_code=status, content=content)

    app.include_router(r)
    return app
