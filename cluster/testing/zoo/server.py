"""The zoo's HTTP surface (aiohttp.web): one process serves any number of zoo nodes, each
on its own port, so a test starts every cheater at the price of one interpreter.

Routes of a model-backed node (honest, perturbed, quantized, bf16): ``POST
/v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and the
LLM node's signature routes (``GET /signature/tokenizer``, ``/signature/config``,
``/signature/tokenizer/files/{name}``), which report the *original* model's files: a
cheater lies about what it serves. Lazy nodes have no signature routes (404, as a plain
OpenAI server). A proxy forwards every route to its target and passes the answers off as
its own (new response ids).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from cluster.testing import http_server as http
from cluster.testing.testnode.protocol import ChatRequest, CompletionRequest
from cluster.testing.zoo.cheaters import (
    CHEATER_KINDS,
    DEFAULT_CHEAT_SHARE,
    LaunderingServing,
    RouteChooser,
    RoutedServing,
)
from cluster.testing.zoo.serving import AnswerCache, LazyServing, ModelServing
from cluster.wire import openai as wire

log = logging.getLogger(__name__)

ZooKind = Literal["honest", "perturbed", "quantized", "bf16", "proxy", "lazy", "random",
                  "launderer", "probe_aware", "temperature_aware", "sometimes"]
# kinds answering with a model, which report the original model's signatures
MODEL_KINDS: tuple[ZooKind, ...] = ("honest", "perturbed", "quantized", "bf16", *CHEATER_KINDS)
ZOO_KINDS: tuple[ZooKind, ...] = (*MODEL_KINDS, "proxy", "lazy", "random")
CHEAPER = "cheaper"  # the cheaper model the cheater kinds serve (not a node kind of its own)

@dataclass
class NodeStats:
    """Requests served per route (``GET /stats``): tests read the proxy's forwarding."""

    by_path: dict[str, int] = field(default_factory=dict)

    def count(self, path: str) -> None:
        self.by_path[path] = self.by_path.get(path, 0) + 1

class ServingApp:
    """Routes of one model-backed or lazy node."""

    def __init__(self, name: str, serving: ModelServing | LazyServing | RoutedServing,
                 signatures: Any | None) -> None:
        self.name = name
        self.serving = serving
        self.signatures = signatures  # cluster.modeldir.signatures.ModelSignatures or None
        self.cache = serving.cache if isinstance(serving, ModelServing) else AnswerCache(0)
        self.stats = NodeStats()

    def build(self) -> web.Application:
        app = http.openai_app(completions=self.completions, chat=self.chat,
                              models=self.models, stats=self.get_stats)
        if self.signatures is not None:
            app.router.add_get(wire.TOKENIZER_SIGNATURE_PATH, self.tokenizer_signature)
            app.router.add_get(wire.CONFIG_SIGNATURE_PATH, self.config_signature)
            app.router.add_get(wire.TOKENIZER_SIGNATURE_PATH + "/files/{name}",
                               self.tokenizer_file)
        return app

    async def get_stats(self, request: web.Request) -> web.Response:
        routes = self.serving.by_route if isinstance(self.serving, RoutedServing) else None
        return http.json_response({"by_path": self.stats.by_path,
                                   **({"by_route": routes} if routes is not None else {})})

    async def models(self, request: web.Request) -> web.Response:
        return http.json_response(self.serving.models())

    async def tokenizer_signature(self, request: web.Request) -> web.Response:
        self.stats.count(request.path)
        return http.json_response(self.signatures.tokenizer().model_dump(mode="json"))

    async def config_signature(self, request: web.Request) -> web.Response:
        self.stats.count(request.path)
        return http.json_response(self.signatures.config().model_dump(mode="json"))

    async def tokenizer_file(self, request: web.Request) -> web.Response:
        from cluster.modeldir.signatures import UnknownSignatureFile

        try:
            found = self.signatures.tokenizer_file(request.match_info["name"])
        except UnknownSignatureFile as exc:
            return http.error_response(str(exc), "not_found", 404)
        return web.Response(body=found.content, content_type=found.media_type,
                            headers={"x-sha256": found.sha256})

    async def completions(self, request: web.Request) -> web.Response:
        return await self._answer(request, CompletionRequest, "complete")

    async def chat(self, request: web.Request) -> web.Response:
        return await self._answer(request, ChatRequest, "chat")

    async def _answer(self, request: web.Request, model: Any,
                      method: Literal["complete", "chat"]) -> web.Response:
        self.stats.count(request.path)
        try:
            payload = http.json_object(await request.read())
            if wire.is_streamed(payload):
                raise ValueError("the zoo does not stream")
            parsed = model.model_validate(payload)
        except (ValueError, ValidationError) as exc:
            return http.invalid_request(exc)
        if isinstance(self.serving, RoutedServing):
            # a cheater picks the serving per request; that serving's cache applies
            chosen, serving = self.serving.route(request.path, payload)
            answer = await self._computed(serving.cache, request.path, payload,
                                          getattr(serving, method), parsed)
            if isinstance(answer, web.Response):
                return answer
            return http.json_response(self.serving.finish(chosen, payload, answer))
        answer = await self._computed(self.cache, request.path, payload,
                                      getattr(self.serving, method), parsed)
        return answer if isinstance(answer, web.Response) else http.json_response(answer)

    async def _computed(self, cache: AnswerCache, path: str, payload: dict[str, Any],
                        handler: Callable[[Any], dict[str, Any]], parsed: Any
                        ) -> dict[str, Any] | web.Response:
        """The answer from ``cache``, from the same request being computed, or computed."""
        key = cache.key(path, payload)
        cached = cache.get(key)
        if cached is not None:
            return cached
        running = cache.running.get(key) if key is not None else None
        if running is not None:
            # The same greedy request is being computed (e.g. for a proxy in front of this
            # node, or another node sharing the model): wait for that answer.
            shared = await asyncio.shield(running)
            if shared is not None:
                return shared
        future: asyncio.Future[dict[str, Any] | None] = \
            asyncio.get_running_loop().create_future()
        if key is not None:
            cache.running[key] = future
        answer: dict[str, Any] | None = None
        try:
            # Model compute blocks: a worker thread keeps this node (and the process's other
            # nodes) answering while it runs; each model serialises its own calls.
            answer = await asyncio.to_thread(handler, parsed)
        except ValueError as exc:
            return http.error_response(str(exc), "invalid_request_error", 400)
        finally:
            if key is not None and cache.running.get(key) is future:
                del cache.running[key]
            future.set_result(answer)
        cache.put(key, answer)
        return answer


class ProxyApp:
    """Forwards every request to ``target`` and answers with the target's answer."""

    def __init__(self, name: str, target: str, timeout_s: float = 600.0) -> None:
        self.name = name
        self.target = target.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None
        self.stats = NodeStats()

    def build(self) -> web.Application:
        app = http.new_app()
        app.router.add_get("/stats", self.get_stats)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_cleanup.append(self._close)
        return app

    async def get_stats(self, request: web.Request) -> web.Response:
        return http.json_response({"by_path": self.stats.by_path})

    async def _close(self, app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()

    async def forward(self, request: web.Request) -> web.Response:
        self.stats.count(request.path)
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", http.JSON_TYPE)}
        try:
            async with self._http.request(request.method, self.target + request.path_qs,
                                          data=body or None, headers=headers) as resp:
                raw = await resp.read()
                status, content_type = resp.status, resp.content_type
        except (aiohttp.ClientError, TimeoutError) as exc:
            return http.error_response(f"upstream: {exc}", "server_error", 502)
        if status == 200 and content_type == http.JSON_TYPE and request.path.startswith("/v1/"):
            answer = json.loads(raw)
            if isinstance(answer, dict):
                return http.json_response(wire.rename_response(answer, "px"))
        return web.Response(body=raw, status=status, content_type=content_type)

def load_serving(kind: ZooKind, model_dir: Path, model_name: str, *, relative_noise: float,
                 seed: int, threads: int | None) -> ModelServing | LazyServing:
    """The serving of a non-proxy kind (model kinds load their weights: seconds each)."""
    if kind in ("lazy", "random"):
        return LazyServing(model_name, random_text=kind == "random", seed=seed)
    from cluster.honesty.local_lm import LocalCausalLM
    from cluster.testing import weights

    transforms: dict[str, Callable[[Any], Any] | None] = {
        "honest": None,
        "perturbed": lambda m: weights.perturb_weights(m, relative_noise, seed),
        "quantized": weights.requantize_int8,
        "bf16": weights.round_trip_bfloat16,
        CHEAPER: weights.drop_layers,
    }
    if kind not in transforms:
        raise ValueError(f"unknown zoo kind {kind!r}; one of {ZOO_KINDS}")
    lm = LocalCausalLM(model_dir, transform=transforms[kind], threads=threads)
    return ModelServing(lm, model_name)


def cheater_serving(spec: NodeSpec, claimed: ModelServing, cheaper: ModelServing,
                    model_name: str, seed: int) -> RoutedServing:
    """A node of a kind of :mod:`cluster.testing.zoo.cheaters`, over the shared servings."""
    chooser = RouteChooser(spec.kind, share=spec.share, seed=seed)  # type: ignore[arg-type]
    routes: dict[Any, ModelServing] = {"claimed": claimed, "cheaper": cheaper}
    if spec.kind == "launderer":
        routes["laundered"] = LaunderingServing(claimed.lm, cheaper.lm, model_name)
    return RoutedServing(spec.name, chooser, routes, model_name)


@dataclass(frozen=True)
class NodeSpec:
    """One zoo node: its name, kind, port (0 = any free one) and, for a proxy, its target
    (another node's name in the same zoo, or a URL)."""

    name: str
    kind: ZooKind
    port: int = 0
    target: str | None = None
    share: float = DEFAULT_CHEAT_SHARE  # kind ``sometimes``: the share of requests it cheats on

class Zoo:
    """The nodes of one zoo process, served on one event loop."""

    def __init__(self, model_dir: Path, model_name: str = "smollm2", host: str = "127.0.0.1",
                 *, relative_noise: float = 0.03, seed: int = 1, threads: int | None = 1
                 ) -> None:
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.host = host
        self.relative_noise = relative_noise
        self.seed = seed
        self.threads = threads
        self.urls: dict[str, str] = {}
        self._servers: list[http.AppServer] = []

    async def _start_app(self, app: web.Application, port: int) -> str:
        server = http.AppServer(self.host, port)
        url = await server.start(app)
        self._servers.append(server)
        return url

    async def start(self, specs: list[NodeSpec]) -> dict[str, str]:
        """Load and serve every node (proxies last, so their targets have URLs)."""
        from cluster.modeldir.signatures import ModelSignatures

        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"zoo node names must be unique: {names}")
        loaded: dict[str, ModelServing | LazyServing] = {}

        async def serving_of(kind: str) -> ModelServing | LazyServing:
            if kind not in loaded:
                loaded[kind] = await asyncio.to_thread(
                    load_serving, kind, self.model_dir, self.model_name,  # type: ignore[arg-type]
                    relative_noise=self.relative_noise, seed=self.seed, threads=self.threads)
            return loaded[kind]

        for spec in sorted(specs, key=lambda s: s.kind == "proxy"):
            if spec.kind == "proxy":
                if spec.target is None:
                    raise ValueError(f"proxy {spec.name!r} needs a target")
                target = self.urls.get(spec.target, spec.target)
                app: web.Application = ProxyApp(spec.name, target).build()
            else:
                serving: ModelServing | LazyServing | RoutedServing
                if spec.kind in CHEATER_KINDS:
                    # every cheater of the process shares the claimed model's serving (and
                    # its answer cache) with the honest node, and one cheaper model
                    claimed = await serving_of("honest")
                    cheaper = await serving_of(CHEAPER)
                    assert isinstance(claimed, ModelServing) and isinstance(cheaper, ModelServing)
                    serving = cheater_serving(spec, claimed, cheaper, self.model_name, self.seed)
                else:
                    serving = await serving_of(spec.kind)
                signatures = (ModelSignatures(self.model_name, str(self.model_dir))
                              if spec.kind in MODEL_KINDS else None)
                app = ServingApp(spec.name, serving, signatures).build()
            self.urls[spec.name] = await self._start_app(app, spec.port)
            log.info("zoo.node_started name=%s kind=%s url=%s", spec.name, spec.kind,
                     self.urls[spec.name])
        return dict(self.urls)

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in reversed(servers):
            await server.stop()
