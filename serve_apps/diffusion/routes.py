"""HTTP routes of the diffusion node: thin FastAPI handlers over :class:`ImageServing`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from cluster.images.errors import ImageRequestError
from serve_apps.diffusion import protocol as wire
from serve_apps.diffusion.serving import ImageServing


def _error(status_code: int, detail: wire.ErrorDetail) -> JSONResponse:
    body = wire.ErrorResponse(error=detail).model_dump(mode="json")
    return JSONResponse(status_code=status_code, content=body)


async def _on_request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageRequestError)
    return _error(
        exc.status_code, wire.ErrorDetail(message=exc.message, param=exc.param, code=exc.error_code)
    )


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    param = None
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            problems.append("body: not valid JSON")
            continue
        location = ".".join(str(part) for part in error.get("loc", ())[1:])
        param = param or location or None
        problems.append(f"{location or 'body'}: {error.get('msg', 'invalid')}")
    return _error(
        422, wire.ErrorDetail(message="; ".join(problems), param=param, code="invalid_request")
    )


def create_api(serving: ImageServing) -> FastAPI:
    """The node's FastAPI app: ``/v1/images/generations``, ``/v1/models``, ``/health``."""
    api = FastAPI(title="testbench diffusion node", docs_url=None, redoc_url=None)
    api.add_exception_handler(ImageRequestError, _on_request_error)
    api.add_exception_handler(RequestValidationError, _on_validation_error)

    @api.post("/v1/images/generations")
    async def create_images(body: wire.ImageGenerationRequest) -> wire.ImageGenerationResponse:
        return await serving.generate(body)

    @api.get("/v1/models")
    async def list_models() -> wire.ModelList:
        return serving.models()

    @api.get("/health")
    async def health() -> wire.HealthResponse:
        return serving.health()

    return api
