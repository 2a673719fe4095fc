"""The package's Ray place: worker actors, the Ray worker pool, the Serve app builder (the
training runs' Ray Train wiring is ``serve_apps/poc/training.py``).

YAML: ``import_path: serve_apps.poc.server:build_poc_node_app`` with ``args`` = PocNodeConfig.
The ingress keeps the node's state, so it runs as exactly one replica; the work scales
through ``workers`` actors of ``cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from serve_apps.poc.callbacks import AiohttpCallbackSender
from serve_apps.poc.config import PocNodeConfig
from serve_apps.poc.deployers import LlmDeployer, load_object
from serve_apps.poc.pool import WorkerPoolFactory
from serve_apps.poc.routes import create_api
from serve_apps.poc.serving import PocNodeService, TrainingLauncher
from serve_apps.poc.training import RayTrainingLauncher
from serve_apps.poc.worker import GeneratedChunk, NonceChunk, PowWorker, PowWorkerSpec

# Worker calls are pure functions of their arguments, so a restarted actor may redo them.
PowWorkerActor = ray.remote(max_restarts=-1, max_task_retries=-1)(PowWorker)


class RayWorkerPool:
    """``workers`` PoC actors; created on construction, killed on close."""

    def __init__(self, spec: PowWorkerSpec, workers: int, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0) -> None:
        options: dict[str, Any] = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        self._actors = [PowWorkerActor.options(**options).remote(spec) for _ in range(workers)]

    @property
    def size(self) -> int:
        return len(self._actors)

    async def ready(self) -> list[str]:
        return list(await asyncio.gather(*(a.ready.remote() for a in self._actors)))

    async def generate(self, worker: int, chunk: NonceChunk) -> GeneratedChunk:
        return await self._actors[worker].generate.remote(chunk)

    async def distances(self, worker: int, public_key: str, nonces: list[int]) -> list[float]:
        return await self._actors[worker].distances.remote(public_key, nonces)

    async def cpu_seconds(self) -> list[float]:
        """Each worker process's CPU time so far (benchmarks)."""
        return list(await asyncio.gather(*(a.cpu_seconds.remote() for a in self._actors)))

    async def close(self) -> None:
        actors, self._actors = self._actors, []
        for actor in actors:
            ray.kill(actor, no_restart=True)


def ray_pool_factory(config: PocNodeConfig) -> WorkerPoolFactory:
    def make(spec: PowWorkerSpec) -> RayWorkerPool:
        return RayWorkerPool(spec, config.workers, config.cpus_per_worker, config.gpus_per_worker)

    return make


def ray_training_launcher(config: PocNodeConfig) -> TrainingLauncher:
    t = config.training
    return RayTrainingLauncher(t.scaling, t.postgres_url, t.max_message_bytes,
                               peer_allowlist=t.peer_allowlist)


class PocNodeIngress:
    def __init__(self, config: dict[str, Any] | PocNodeConfig,
                 deployer: LlmDeployer | None = None) -> None:
        cfg = PocNodeConfig.model_validate(config)
        self._auth = cfg.auth
        self._service = PocNodeService(
            cfg, ray_pool_factory(cfg), deployer or load_object(cfg.deployer)(**cfg.deployer_args),
            AiohttpCallbackSender(cfg.callback_timeout_s), trainer=ray_training_launcher(cfg),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self._service, self._auth)

    async def __del__(self) -> None:
        await self._service.shutdown()


def build_poc_node_app(config: dict[str, Any] | PocNodeConfig | None = None) -> Application:
    """The MLNode Serve app (``serve run`` and a RayService call it with ``args``: one
    parameter, as Serve requires of a builder)."""
    return poc_node_app(config)


def poc_node_app(config: dict[str, Any] | PocNodeConfig | None = None,
                 deployer: LlmDeployer | None = None) -> Application:
    """:func:`build_poc_node_app` with ``deployer`` overriding ``config.deployer`` (tests)."""
    cfg = PocNodeConfig.model_validate(config or {})
    deployment = serve.deployment(**cfg.deployment.serve_options())(
        serve.ingress()(PocNodeIngress)
    )
    # the model itself, not its JSON: a dump would mask training.node_key_hex
    return deployment.bind(cfg, deployer)
