"""The diffusion node's endpoint logic: from a validated request to a response body."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from cluster.images.config import DiffusionNodeConfig, parse_size
from cluster.images.engine import GenerationJob, ImageEngine
from cluster.images.errors import ImageRequestError
from serve_apps.diffusion import protocol as wire

log = logging.getLogger(__name__)


class ImageServing:
    """Image generation, model listing and health over an :class:`ImageEngine`.

    Requests are checked against ``config.limits`` (``ImageRequestError``, HTTP 400) and
    completed with ``config.defaults``. Generation runs in a worker thread, one request at a
    time, so the event loop keeps answering ``/health`` and ``/v1/models`` meanwhile.
    """

    def __init__(
        self,
        engine: ImageEngine,
        config: DiffusionNodeConfig,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = asyncio.Lock()
        self._started = int(clock())

    @property
    def model_id(self) -> str:
        return self._config.model_id

    def models(self) -> wire.ModelList:
        return wire.ModelList(data=[wire.ModelCard(id=self.model_id, created=self._started)])

    def health(self) -> wire.HealthResponse:
        return wire.HealthResponse(model=self.model_id)

    def plan(self, request: wire.ImageGenerationRequest) -> GenerationJob:
        """The job a request asks for, or ``ImageRequestError`` if it is outside the limits."""
        limits, defaults = self._config.limits, self._config.defaults
        if request.model is not None and request.model != self.model_id:
            raise ImageRequestError(
                f"model {request.model!r} is not served here; this node serves {self.model_id!r}",
                param="model", status_code=404, error_code="model_not_found",
            )
        if len(request.prompt) > limits.max_prompt_chars:
            raise ImageRequestError(
                f"prompt has {len(request.prompt)} characters; at most {limits.max_prompt_chars}",
                param="prompt",
            )
        if request.negative_prompt is not None and (
            len(request.negative_prompt) > limits.max_prompt_chars
        ):
            raise ImageRequestError(
                f"negative_prompt is longer than {limits.max_prompt_chars} characters",
                param="negative_prompt",
            )
        if request.n > limits.max_n:
            raise ImageRequestError(f"n={request.n} exceeds this node's limit of {limits.max_n}",
                                    param="n")
        steps = defaults.steps if request.steps is None else request.steps
        if steps > limits.max_steps:
            raise ImageRequestError(
                f"steps={steps} exceeds this node's limit of {limits.max_steps}", param="steps"
            )
        width, height = parse_size(request.size or defaults.size)
        if not (limits.min_side <= width <= limits.max_width
                and limits.min_side <= height <= limits.max_height):
            raise ImageRequestError(
                f"size {width}x{height} is outside {limits.min_side}x{limits.min_side}"
                f"..{limits.max_width}x{limits.max_height}",
                param="size",
            )
        if width % limits.size_multiple or height % limits.size_multiple:
            raise ImageRequestError(
                f"size {width}x{height}: width and height must be multiples of "
                f"{limits.size_multiple}",
                param="size",
            )
        seed = request.seed
        if seed is None:
            seed = self._rng.randrange(0, 2**32)
        elif seed + request.n - 1 > wire.MAX_SEED:
            raise ImageRequestError(f"seed + n - 1 must not exceed {wire.MAX_SEED}", param="seed")
        guidance = defaults.guidance_scale if request.guidance_scale is None else (
            request.guidance_scale
        )
        return GenerationJob(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            seeds=tuple(seed + index for index in range(request.n)),
        )

    async def generate(self, request: wire.ImageGenerationRequest) -> wire.ImageGenerationResponse:
        job = self.plan(request)
        async with self._lock:
            started = time.perf_counter()
            images = await asyncio.to_thread(self._engine.generate, job)
            elapsed = time.perf_counter() - started
        log.info(
            "diffusion.generated n=%d size=%dx%d steps=%d seed=%d latency_s=%.3f",
            len(images), job.width, job.height, job.steps, job.seeds[0], elapsed,
        )
        return wire.ImageGenerationResponse(
            created=int(self._clock()),
            model=self.model_id,
            size=f"{job.width}x{job.height}",
            steps=job.steps,
            guidance_scale=job.guidance_scale,
            data=[
                wire.ImageObject(b64_json=wire.encode_png_b64(image), seed=seed)
                for image, seed in zip(images, job.seeds, strict=True)
            ],
        )
