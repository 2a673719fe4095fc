"""HTTP routes of the streaming app: thin FastAPI handlers over :class:`StreamingServing`.

Handlers read the raw body (its sha256 is what the receipt signs) rather than a parsed
model, and hand back the upstream's bytes untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.core.settings import AuthSettings
from cluster.streaming import protocol as wire
from serve_apps.common.peer_auth import install_peer_auth
from serve_apps.streaming.serving import ForwardedStream, JobRequestError, StreamingServing


async def _on_request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobRequestError)
    return JSONResponse(status_code=exc.status,
                        content=wire.error_body(exc.message, exc.kind, exc.code, exc.param))


def create_api(serving: StreamingServing, auth: AuthSettings) -> FastAPI:
    """``/v1/completions`` and ``/v1/chat/completions`` with receipts, ``/v1/models``,
    ``/job`` (the job id and the key its receipts are signed with)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await serving.close()

    api = FastAPI(title="testbench streaming job", docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    api.add_exception_handler(JobRequestError, _on_request_error)
    install_peer_auth(api, auth, purpose="jobs")

    async def forward(request: Request, endpoint: str) -> Response:
        body = await request.body()
        answer = await serving.forward(endpoint, body, request.headers.get(wire.HEADER_REQUEST_ID))
        if isinstance(answer, ForwardedStream):
            return StreamingResponse(answer.chunks, media_type=answer.content_type,
                                     headers={**answer.headers, "Cache-Control": "no-cache"})
        return Response(content=answer.body, status_code=answer.status,
                        media_type=answer.content_type, headers=answer.headers)

    @api.post(wire.COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await forward(request, wire.COMPLETIONS)

    @api.post(wire.CHAT_COMPLETIONS)
    async def chat_completions(request: Request) -> Response:
        return await forward(request, wire.CHAT_COMPLETIONS)

    @api.get("/v1/models")
    async def models() -> Response:
        answer = await serving.models()
        return Response(content=answer.body, status_code=answer.status,
                        media_type=answer.content_type)

    @api.get("/job")
    async def job() -> wire.JobInfo:
        return serving.info()

    return api
