"""Typed errors of the diffusion node."""

from __future__ import annotations

from cluster.core.errors import ErrorCode, TestbenchError


class ImageRequestError(TestbenchError):
    """A well-formed request the node refuses (outside its limits, unknown model).

    ``status_code`` is the HTTP status the routes answer with; ``param`` names the
    offending request field, as in OpenAI error bodies.
    """

    code = ErrorCode.BAD_PARAMS

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status_code: int = 400,
        error_code: str = "invalid_value",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.error_code = error_code


class PipelineLoadError(TestbenchError):
    """The diffusers pipeline could not be built, loaded or placed on its device."""

    code = ErrorCode.NODE
