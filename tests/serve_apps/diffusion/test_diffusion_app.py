"""The diffusion node on a real local Ray Serve app, through HTTP.

The app runs the tiny pipeline (built once into ``.cache/models/tiny-diffusion``) under its
own name and route prefix, beside whatever other Serve apps the session runs, and only it is
deleted at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from pydantic import ValidationError
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from cluster.core.settings import PROJECT_ROOT
from cluster.images.checks import decode_png_b64, psnr, reproducible
from serve_apps.diffusion import DiffusionNodeConfig, build_diffusion_app

APP_NAME = "diffusion"
ROUTE_PREFIX = "/diffusion"
CONFIGS = PROJECT_ROOT / "serve_apps" / "configs"
CACHE_DIR = PROJECT_ROOT / ".cache"
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def diffusion_url(serve_http_port: int) -> Iterator[str]:
    """The app's base URL; Serve itself (and its port) is the session's, from conftest."""
    from ray import serve

    # A small CPU share: the session's other Serve apps (the vLLM node) need the rest.
    config = DiffusionNodeConfig.model_validate(
        {"cache_dir": CACHE_DIR, "torch_threads": 1, "deployment": {"num_cpus": 0.5}}
    )
    serve.run(build_diffusion_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX)
    try:
        yield f"http://127.0.0.1:{serve_http_port}{ROUTE_PREFIX}"
    finally:
        serve.delete(APP_NAME)


def _generate(url: str, **body: Any) -> requests.Response:
    return requests.post(f"{url}/v1/images/generations", json=body, timeout=TIMEOUT_S)


def _images(url: str, **body: Any) -> list[str]:
    response = _generate(url, **body)
    assert response.status_code == 200, response.text
    return [item["b64_json"] for item in response.json()["data"]]


# -- configuration (no Ray) ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["diffusion_cpu.yaml", "diffusion_gpu.yaml"])
def test_serve_config_yamls_validate_as_serve_deploy_schemas(name: str) -> None:
    raw = yaml.safe_load((CONFIGS / name).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.name == APP_NAME and app.route_prefix == ROUTE_PREFIX
    assert app.import_path == "serve_apps.diffusion:build_diffusion_app"
    DiffusionNodeConfig.model_validate(app.args)


def test_builder_takes_a_dict_or_a_config() -> None:
    assert isinstance(build_diffusion_app({"defaults": {"steps": 2}}), Application)
    assert isinstance(build_diffusion_app(DiffusionNodeConfig()), Application)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ({"surprise": 1}, "Extra inputs"),
        ({"dtype": "float16"}, "float16 needs device cuda"),
        ({"device": "cuda"}, "num_gpus"),
        ({"defaults": {"size": "1024x1024"}}, "exceeds the size limits"),
        ({"defaults": {"size": "60x64"}}, "multiple of 8"),
        ({"defaults": {"steps": 60}}, "max_steps"),
        ({"limits": {"max_n": 0}}, "greater than or equal to 1"),
    ],
)
def test_config_rejects_bad_settings(args: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        DiffusionNodeConfig.model_validate(args)


def test_config_defaults_serve_the_tiny_pipeline_on_cpu() -> None:
    config = DiffusionNodeConfig()
    assert (config.model_source, config.device, config.model_id) == (None, "cpu", "tiny-diffusion")
    assert Path(config.cache_dir) == CACHE_DIR


# -- the live app ----------------------------------------------------------------------------


def test_health_and_models_name_the_served_model(diffusion_url: str) -> None:
    health = requests.get(f"{diffusion_url}/health", timeout=TIMEOUT_S)
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "tiny-diffusion"}
    models = requests.get(f"{diffusion_url}/v1/models", timeout=TIMEOUT_S).json()
    assert models["object"] == "list"
    assert [card["id"] for card in models["data"]] == ["tiny-diffusion"]


def test_same_seed_gives_the_identical_png(diffusion_url: str) -> None:
    response = _generate(diffusion_url, prompt="a lighthouse at dusk", seed=42)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["size"], body["steps"]) == ("tiny-diffusion", "64x64", 4)
    assert body["data"][0]["seed"] == 42
    (first,) = [item["b64_json"] for item in body["data"]]
    (second,) = _images(diffusion_url, prompt="a lighthouse at dusk", seed=42)
    assert first == second
    assert decode_png_b64(first).shape == (64, 64, 3)
    assert psnr(first, second) == math.inf and reproducible(first, second)


def test_different_seeds_or_prompts_give_different_images(diffusion_url: str) -> None:
    (base,) = _images(diffusion_url, prompt="a lighthouse at dusk", seed=42)
    (other_seed,) = _images(diffusion_url, prompt="a lighthouse at dusk", seed=43)
    (other_prompt,) = _images(diffusion_url, prompt="a red bicycle", seed=42)
    assert psnr(base, other_seed) < 20 and not reproducible(base, other_seed)
    assert psnr(base, other_prompt) < math.inf


def test_a_served_image_is_regenerated_exactly_in_another_process(diffusion_url: str) -> None:
    """What a validator does: same prompt, settings and seed on its own copy of the model."""
    from cluster.images.engine import DiffusersEngine, GenerationJob
    from serve_apps.diffusion.protocol import encode_png_b64

    (served,) = _images(diffusion_url, prompt="a lighthouse at dusk", seed=42, steps=3)
    engine = DiffusersEngine.load(DiffusionNodeConfig(cache_dir=CACHE_DIR, torch_threads=2))
    job = GenerationJob("a lighthouse at dusk", None, 64, 64, 3, 7.5, (42,))
    (local,) = engine.generate(job)
    assert psnr(served, encode_png_b64(local)) == math.inf


def test_n_images_carry_consecutive_seeds_each_reproducible_alone(diffusion_url: str) -> None:
    response = _generate(diffusion_url, prompt="three cats", seed=7, n=3)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["seed"] for item in data] == [7, 8, 9]
    assert len({item["b64_json"] for item in data}) == 3
    (alone,) = _images(diffusion_url, prompt="three cats", seed=8)
    assert psnr(data[1]["b64_json"], alone) == math.inf


def test_size_and_steps_are_honoured(diffusion_url: str) -> None:
    response = _generate(diffusion_url, prompt="wide", seed=1, size="96x64", steps=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["size"], body["steps"]) == ("96x64", 2)
    assert decode_png_b64(body["data"][0]["b64_json"]).shape == (64, 96, 3)


def test_a_request_without_seed_reports_the_seed_that_reproduces_it(diffusion_url: str) -> None:
    response = _generate(diffusion_url, prompt="surprise me")
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    (again,) = _images(diffusion_url, prompt="surprise me", seed=item["seed"])
    assert psnr(item["b64_json"], again) == math.inf


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": ""}, 422, "prompt"),
        ({"seed": 1}, 422, "prompt"),
        ({"prompt": "x", "n": 0}, 422, "n"),
        ({"prompt": "x", "n": "2"}, 422, "n"),
        ({"prompt": "x", "seed": -1}, 422, "seed"),
        ({"prompt": "x", "size": "64"}, 422, "size"),
        ({"prompt": "x", "steps": 0}, 422, "steps"),
        ({"prompt": "x", "response_format": "url"}, 422, "response_format"),
        ({"prompt": "x", "quality": "hd"}, 422, "quality"),
        ({"prompt": "x", "n": 5}, 400, "n"),
        ({"prompt": "x", "steps": 51}, 400, "steps"),
        ({"prompt": "x", "size": "1024x64"}, 400, "size"),
        ({"prompt": "x", "size": "16x16"}, 400, "size"),
        ({"prompt": "x", "size": "60x64"}, 400, "size"),
        ({"prompt": "x" * 2001}, 400, "prompt"),
        ({"prompt": "x", "model": "sdxl"}, 404, "model"),
    ],
)
def test_bad_requests_get_a_clear_error(
    diffusion_url: str, body: dict[str, Any], status: int, param: str
) -> None:
    response = requests.post(
        f"{diffusion_url}/v1/images/generations", json=body, timeout=TIMEOUT_S
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]


def test_a_body_that_is_not_json_gets_422(diffusion_url: str) -> None:
    response = requests.post(
        f"{diffusion_url}/v1/images/generations",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["error"]["message"]


# ---- the diffusion_repro task: what the measuring loop does with a diffusion node --------
def _repro_adapter(model: str = "tiny-diffusion") -> Any:
    from cluster.core.schemas import Node
    from cluster.tasks.registry import load_adapter

    node = Node(node_id="diff", url="http://127.0.0.1:1", model=model, kind="diffusion")
    return load_adapter("diffusion_repro", PROJECT_ROOT / "datasets", node)


def test_the_loop_measures_a_serve_diffusion_node_as_reproducible(diffusion_url: str) -> None:
    import asyncio

    from cluster.core.schemas import Node
    from cluster.testing.full_pass import read_rows, run_pass

    adapter = _repro_adapter()
    node = Node(node_id="tiny-diffusion-serve", url=diffusion_url, model="tiny-diffusion",
                kind="diffusion")
    rows = read_rows(PROJECT_ROOT / "datasets", "diffusion_repro")
    result = asyncio.run(run_pass(adapter, node, {i: rows[i] for i in range(3)}, concurrency=2))
    assert not result.failed
    for metrics in result.per_doc.values():
        # same pipeline, seed and dtype: identical up to float rounding of thread splits
        assert metrics["reproducible"] == 1.0
        assert metrics["psnr_db"] >= 60.0


def test_a_different_image_is_flagged_and_garbage_is_the_nodes_fault() -> None:
    import base64
    import io

    import numpy as np
    from PIL import Image

    from cluster.core.errors import ErrorCode, EvaluationError, NodeError
    from cluster.core.schemas import Relay

    adapter = _repro_adapter()
    doc = {"prompt": "a lighthouse at sunset", "seed": 5}
    honest = adapter.reference_image(doc)
    rng = np.random.default_rng(0)
    noisy = np.clip(honest.astype(int) + rng.integers(-40, 40, honest.shape), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buf, format="PNG")

    def relay(response: dict[str, Any]) -> Relay:
        return Relay(prompt_id="k|0", sample_key="k", node_id="diff", task="diffusion_repro",
                     doc_id=0, request_index=0, error_code=ErrorCode.OK, response=response,
                     started_at=0.0, finished_at=0.0)

    image = {"data": [{"b64_json": base64.b64encode(buf.getvalue()).decode()}]}
    other = adapter.score(0, doc, [relay(image)])
    assert other["reproducible"] == 0.0 and other["psnr_db"] < 30
    with pytest.raises(NodeError):
        adapter.score(0, doc, [relay({"data": [{"b64_json": "not-base64!"}]})])
    with pytest.raises(NodeError):
        adapter.score(0, doc, [relay({"images": []})])
    with pytest.raises(EvaluationError, match="no reference pipeline"):
        _repro_adapter("sdxl-claimed").score(0, doc, [relay(image)])
