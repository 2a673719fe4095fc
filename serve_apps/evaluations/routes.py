"""HTTP routes of the evaluations app: thin FastAPI handlers over :class:`EvaluationService`.

``/v1/evaluations*`` need ``Authorization: Bearer <tenant token>``; ``/leaderboard``,
``/v1/leaderboard`` and ``/health`` are public. The app's lifespan starts and stops the
service (and with it the replica's run executor).

No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations,
which name values local to :func:`create_api` (the tenant dependency, page-size bounds).
"""

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.evaluations import protocol as wire
from serve_apps.evaluations.page import leaderboard_page
from serve_apps.evaluations.serving import ApiError, EvaluationService

RUN_ID = Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the evaluation's id")
LOG_KEY = r"^[0-9]{1,20}-[0-9a-f]{1,16}$"
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": wire.ErrorResponse} for code in (401, 404, 409, 422)
}


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: text a user sent (even a lone
    surrogate inside a dict key) can never make rendering the response fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error(status_code: int, detail: wire.ErrorDetail, headers: dict[str, str] | None = None
           ) -> AsciiJSONResponse:
    body = wire.ErrorResponse(error=detail).model_dump(mode="json")
    return AsciiJSONResponse(status_code=status_code, content=body, headers=headers)


async def _on_api_error(_: Request, exc: Exception) -> AsciiJSONResponse:
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return _error(exc.status_code, wire.ErrorDetail(
        message=exc.message, type=exc.error_type, param=exc.param, code=exc.error_code,
    ), headers)


async def _on_validation_error(_: Request, exc: Exception) -> AsciiJSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems, param = [], None
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            problems.append("body: not valid JSON")
            continue
        # The input itself is never echoed: it may be huge or not encodable.
        location = ".".join(str(part) for part in error.get("loc", ()))
        param = param or location or None
        problems.append(f"{location or 'request'}: {error.get('msg', 'invalid')}")
    return _error(422, wire.ErrorDetail(message="; ".join(problems) or "invalid request",
                                        param=param, code="invalid_request"))


async def _on_http_error(_: Request, exc: Exception) -> AsciiJSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _error(exc.status_code, wire.ErrorDetail(message=str(exc.detail), code="http_error"),
                  dict(exc.headers) if exc.headers else None)


def create_api(service: EvaluationService) -> FastAPI:
    """The app: ``/v1/evaluations`` API, ``/leaderboard`` page and its JSON, ``/health``."""
    cfg = service.settings.evaluations

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    api = FastAPI(
        title="testbench evaluations", version="1",
        description="lm-eval runs against OpenAI-compatible endpoints, by ticket "
                    "(results in lm-eval's results JSON), and the nodes' leaderboard.",
        default_response_class=AsciiJSONResponse, lifespan=lifespan,
        docs_url=None, redoc_url=None,
    )
    api.add_exception_handler(ApiError, _on_api_error)
    api.add_exception_handler(RequestValidationError, _on_validation_error)
    api.add_exception_handler(StarletteHTTPException, _on_http_error)
    bearer = HTTPBearer(auto_error=False, description="a tenant's token")

    def tenant(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str:
        return service.authenticate(credentials.credentials if credentials else None)

    Tenant = Annotated[str, Depends(tenant)]

    @api.post("/v1/evaluations", status_code=202, responses={
        400: {"model": wire.ErrorResponse}, **_ERRORS,
        413: {"model": wire.ErrorResponse, "description": "custom task files too large"}})
    async def submit(body: wire.EvaluationRequest, who: Tenant, request: Request
                     ) -> AsciiJSONResponse:
        status = await service.submit(who, body)
        location = f"{request.scope.get('root_path', '')}/v1/evaluations/{status.id}"
        return AsciiJSONResponse(status_code=202, content=status.model_dump(mode="json"),
                                 headers={"Location": location})

    @api.get("/v1/evaluations", responses=_ERRORS)
    async def list_evaluations(
        who: Tenant,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        limit: Annotated[int, Query(ge=1, le=cfg.max_page_size)] = cfg.page_size,
        state: wire.RunStateFilter | None = None,
    ) -> wire.EvaluationList:
        return await service.list_runs(who, state, offset, limit)

    @api.get("/v1/evaluations/{run_id}", responses=_ERRORS)
    async def get_evaluation(who: Tenant, run_id: Annotated[str, RUN_ID]
                             ) -> wire.EvaluationStatus:
        return await service.status(who, run_id)

    @api.delete("/v1/evaluations/{run_id}", responses=_ERRORS)
    async def cancel_evaluation(who: Tenant, run_id: Annotated[str, RUN_ID]
                                ) -> wire.EvaluationStatus:
        return await service.cancel(who, run_id)

    @api.post("/v1/evaluations/{run_id}/suspend", responses=_ERRORS)
    async def suspend_evaluation(who: Tenant, run_id: Annotated[str, RUN_ID]
                                 ) -> wire.EvaluationStatus:
        """Stop the run and keep its work: suspended until resumed (LMEvalJob's suspend)."""
        return await service.suspend(who, run_id)

    @api.post("/v1/evaluations/{run_id}/resume", responses=_ERRORS)
    async def resume_evaluation(who: Tenant, run_id: Annotated[str, RUN_ID]
                                ) -> wire.EvaluationStatus:
        """Run a suspended run on; docs scored and requests answered are not repeated."""
        return await service.resume(who, run_id)

    @api.get("/v1/evaluations/{run_id}/results", responses=_ERRORS,
             response_description="lm-eval's results JSON")
    async def get_results(
        who: Tenant,
        run_id: Annotated[str, RUN_ID],
        samples: Annotated[bool, Query(description="add lm-eval's per-sample records")] = False,
    ) -> dict[str, Any]:
        return await service.results(who, run_id, samples)

    @api.get("/v1/evaluations/{run_id}/logs", responses={
        200: {"content": {"text/event-stream": {}},
              "description": "server-sent events: `log` (LogEvent), then `end` (EndEvent)"},
        **_ERRORS,
    }, response_class=StreamingResponse)
    async def stream_logs(
        who: Tenant,
        run_id: Annotated[str, RUN_ID],
        follow: Annotated[bool, Query(description="stay open until the run ends")] = True,
        last_event_id: Annotated[str | None, Header(pattern=LOG_KEY)] = None,
    ) -> StreamingResponse:
        events = await service.log_events(who, run_id, last_event_id, follow)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @api.get("/v1/leaderboard")
    async def leaderboard() -> wire.LeaderboardResponse:
        return await service.leaderboard()

    @api.get("/leaderboard", response_class=HTMLResponse)
    async def leaderboard_html(request: Request) -> HTMLResponse:
        return HTMLResponse(leaderboard_page(f"{request.scope.get('root_path', '')}"
                                             "/v1/leaderboard"))

    @api.get("/health")
    async def health() -> wire.HealthResponse:
        return service.health()

    return api
