"""Any lm-eval task in the evaluation service, offline, against lm-eval's own runs.

The service (its class, worker and runner in process, on the session's stores; no Serve)
and lm-eval 0.4.13's ``simple_evaluate`` run the same tasks against the same test node:

- lm-eval's **built-in** ``openbookqa`` YAML (the project's ``datasets/`` is replaced by a
  folder without it), its ``allenai/openbookqa`` data read from an offline data directory in
  the hub's layout and schema, converted here from the shipped rows: per-doc records
  (``doc_hash``, ``prompt_hash``, ``target_hash`` included) and aggregates identical, also
  with a chat template and a system instruction;
- a group of a task and a nested group (``tests/support/task_sources.py``): every subtask's
  and group's results, stderr included, identical;
- tenants' custom tasks: an upload runs; code execution, private template attributes,
  unknown fields, bad YAML and oversized uploads are refused with a 4xx naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from task_sources import GROUP, SLICES, hub_rows, write_group_tasks, write_hub_openbookqa

from cluster.core.settings import (
    EndpointAllowlist,
    EvaluationSettings,
    RequesterSettings,
    Settings,
    StoreSettings,
    TaskSourceSettings,
)
from cluster.tasks.lmeval import TaskCatalog
from cluster.testing.testnode import NodeBehaviour, TestNode
from serve_apps.evaluations import protocol as wire
from serve_apps.evaluations.routes import create_api
from serve_apps.evaluations.serving import EvaluationService

TOKEN = "any-task-token-0123456789abcdef"
LIMIT = 40
SYSTEM = "You answer science questions."


@pytest.fixture(scope="module")
def sources_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("any_task")
    write_hub_openbookqa(root / "offline")
    write_group_tasks(root / "datasets")
    bad = root / "offline" / "tenant-tasks" / "runs-code"
    bad.mkdir(parents=True)
    (bad / "qa.yaml").write_text(_custom_yaml("qa_code", process_docs="!function utils.p"))
    (bad / "test.jsonl").write_text(_rows_jsonl(3))
    return root


def service_settings(stores: StoreSettings, root: Path, **evaluations: Any) -> Settings:
    stores = stores.model_copy(update={"mongo_database": f"at_{uuid.uuid4().hex[:10]}"})
    cfg: dict[str, Any] = {
        "tenants": {"t": TOKEN}, "endpoint_allowlists": {"t": EndpointAllowlist.loopback()},
        "max_concurrent_runs": 1, "per_run_concurrency": 8, "chunk_docs": 16,
        "lease_s": 5.0, "poll_s": 0.2,
    }
    return Settings(
        stores=stores, datasets_dir=root / "datasets", cache_dir=root / "cache",
        tasks_sources=TaskSourceSettings(offline_data_dir=root / "offline"),
        evaluations=EvaluationSettings(**(cfg | evaluations)),
        requester=RequesterSettings(endpoint_allowlist=EndpointAllowlist.loopback()))


@pytest.fixture
async def node(smollm2_dir: Path) -> AsyncIterator[TestNode]:
    server = TestNode(NodeBehaviour(mode="correct"), tokenizer_path=smollm2_dir)
    await server.start()
    yield server
    await server.stop()


async def _wait(service: EvaluationService, run_id: str, timeout_s: float = 120.0
                ) -> wire.EvaluationStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await service.status("t", run_id)
        if status.state == "complete":
            return status
        assert status.state not in ("failed", "cancelled"), status.error
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.1)


def run_lm_eval(url: str, tokenizer: Path, tasks: list[Any], manager: Any,
                limit: int | None, **options: Any) -> dict[str, Any]:
    """lm-eval's own run (``local-completions``), as JSON (what ``--output_path`` writes)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    results = simple_evaluate(
        model="local-completions",
        model_args=(f"base_url={url}/v1/completions,model=smollm2,tokenizer={tokenizer},"
                    "tokenizer_backend=huggingface,num_concurrent=8,max_retries=1"),
        tasks=tasks, task_manager=manager, limit=limit, log_samples=True, **options)
    assert results is not None
    return json.loads(json.dumps(results, default=handle_non_serializable, ensure_ascii=False))


async def _ours_and_theirs(settings: Settings, node: TestNode, tokenizer: Path,
                           request: dict[str, Any], theirs: Callable[[], dict[str, Any]]
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
    service = EvaluationService(settings)
    await service.start()
    try:
        status = await service.submit("t", wire.EvaluationRequest.model_validate(
            {"endpoint": node.base_url, "model": "smollm2", "tokenizer": str(tokenizer)}
            | request))
        lm_eval_results = await asyncio.to_thread(theirs)  # meanwhile, the service runs ours
        await _wait(service, status.id)
        return await service.results("t", status.id, samples=True), lm_eval_results
    finally:
        await service.stop()


def _records(results: dict[str, Any], task: str) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["doc_id"], r["filter"]): r for r in results["samples"][task]}


def _assert_same_task(ours: dict[str, Any], theirs: dict[str, Any], task: str, n: int) -> None:
    assert ours["results"][task] == theirs["results"][task], task
    mine, lm = _records(ours, task), _records(theirs, task)
    assert len(lm) == n and sorted(mine) == sorted(lm)
    for key, record in lm.items():
        # the whole record: doc, arguments, resps, metrics, and the three hashes
        assert mine[key] == record, (task, key)
    for section in ("n-samples", "n-shot", "versions", "higher_is_better"):
        assert ours[section][task] == theirs[section][task], (section, task)


async def test_builtin_task_offline_in_hub_layout_equals_lm_eval_doc_by_doc(
    loaded_stores: StoreSettings, sources_dir: Path, node: TestNode, smollm2_dir: Path
) -> None:
    settings = service_settings(loaded_stores, sources_dir)
    catalog = TaskCatalog.of(settings.datasets_dir, settings.tasks_sources)
    config = catalog.config("openbookqa")
    # lm-eval's own YAML (not a copy), reading the converted hub-layout parquet
    assert "/lm_eval/tasks/openbookqa/" in config["metadata"]["config_path"]
    assert config["dataset_path"] == "parquet"
    assert config["doc_to_text"] == "question_stem"
    ours, theirs = await _ours_and_theirs(
        settings, node, smollm2_dir, {"tasks": ["openbookqa"], "limit": LIMIT},
        lambda: run_lm_eval(str(node.base_url), smollm2_dir, [config],
                            catalog.local_manager(), LIMIT))
    _assert_same_task(ours, theirs, "openbookqa", LIMIT)
    hashes = [(r["doc_hash"], r["prompt_hash"], r["target_hash"])
              for r in ours["samples"]["openbookqa"]]
    assert len(set(hashes)) == LIMIT  # one per doc, all equal to lm-eval's (above)
    assert 0.0 < ours["results"]["openbookqa"]["acc,none"] < 1.0


async def test_chat_template_and_system_instruction_equal_lm_eval(
    loaded_stores: StoreSettings, sources_dir: Path, node: TestNode, smollm2_dir: Path
) -> None:
    settings = service_settings(loaded_stores, sources_dir)
    catalog = TaskCatalog.of(settings.datasets_dir, settings.tasks_sources)
    limit = 8
    ours, theirs = await _ours_and_theirs(
        settings, node, smollm2_dir,
        {"tasks": ["openbookqa"], "limit": limit, "apply_chat_template": True,
         "system_instruction": SYSTEM, "fewshot_as_multiturn": True},
        lambda: run_lm_eval(str(node.base_url), smollm2_dir, [catalog.config("openbookqa")],
                            catalog.local_manager(), limit, apply_chat_template=True,
                            system_instruction=SYSTEM, fewshot_as_multiturn=True))
    _assert_same_task(ours, theirs, "openbookqa", limit)
    prompt = ours["samples"]["openbookqa"][0]["arguments"][0][0]
    assert SYSTEM in prompt and "<|im_start|>" in prompt  # SmolLM2's chat template


async def test_group_with_nested_group_equals_lm_eval_subtasks_and_aggregates(
    loaded_stores: StoreSettings, sources_dir: Path, node: TestNode, smollm2_dir: Path
) -> None:
    settings = service_settings(loaded_stores, sources_dir)
    catalog = TaskCatalog.of(settings.datasets_dir, settings.tasks_sources)
    ours, theirs = await _ours_and_theirs(
        settings, node, smollm2_dir, {"tasks": [GROUP]},
        lambda: run_lm_eval(str(node.base_url), smollm2_dir, [GROUP],
                            catalog.local_manager(), None))
    for task, (start, stop) in SLICES.items():
        _assert_same_task(ours, theirs, task, stop - start)
    for section in ("results", "groups", "group_subtasks", "versions", "n-shot",
                    "higher_is_better", "n-samples"):
        assert ours[section] == theirs[section], section
    outer, inner = ours["groups"][GROUP], ours["groups"]["tb_inner"]
    assert outer["sample_len"] == 62 and inner["sample_len"] == 32
    assert isinstance(outer["acc_stderr,none"], float)
    assert ours["group_subtasks"] == {GROUP: ["tb_head", "tb_inner"],
                                      "tb_inner": ["tb_mid", "tb_tail"]}


# ---------------------------------------------------------------------- custom tasks
def _rows_jsonl(n: int) -> str:
    return "".join(json.dumps(r) + "\n" for r in hub_rows()[:n])


def _custom_yaml(name: str, **fields: str) -> str:
    lines = [f"task: {name}", "dataset_path: json",
             "dataset_kwargs:", "  data_files:", "    test: test.jsonl",
             "output_type: multiple_choice", "test_split: test",
             "doc_to_text: question_stem",
             'doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"',
             'doc_to_choice: "{{choices.text}}"',
             "metric_list:", "  - metric: acc"]
    lines += [f"{k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def _upload(files: dict[str, str | bytes]) -> dict[str, Any]:
    return {"files": {name: base64.b64encode(
        content.encode() if isinstance(content, str) else content).decode()
        for name, content in files.items()}}


@pytest.fixture
async def api_client(loaded_stores: StoreSettings, sources_dir: Path
                     ) -> AsyncIterator[Callable[..., Any]]:
    """POST /v1/evaluations on an API-only service (nothing runs), over its ASGI app."""
    settings = service_settings(loaded_stores, sources_dir, max_concurrent_runs=0,
                                max_custom_task_bytes=4096)
    service = EvaluationService(settings)
    await service.start()
    transport = httpx.ASGITransport(app=create_api(service))

    async def post(body: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://eval") as client:
            return await client.post("/v1/evaluations", json={
                "endpoint": "http://127.0.0.1:9/v1/completions", "model": "m",
                "tokenizer": "/nonexistent"} | body,
                headers={"Authorization": f"Bearer {TOKEN}"})

    yield post
    await service.stop()


async def _refused(post: Callable[..., Any], body: dict[str, Any], status: int
                   ) -> dict[str, Any]:
    resp = await post(body)
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    return error


async def test_custom_task_code_execution_is_refused_by_default(
    api_client: Callable[..., Any]
) -> None:
    error = await _refused(api_client, {"tasks": ["qa_fn"], "custom_tasks": [_upload({
        "qa.yaml": _custom_yaml("qa_fn", process_docs="!function utils.process_docs"),
        "utils.py": "def process_docs(d):\n    return d\n", "test.jsonl": _rows_jsonl(3)})]},
        400)
    assert error["param"] == "custom_tasks.0.files.utils.py"
    assert "allow_code_execution" in error["message"]
    error = await _refused(api_client, {"tasks": ["qa_fn"], "custom_tasks": [_upload({
        "qa.yaml": _custom_yaml("qa_fn", process_docs="!function utils.process_docs"),
        "test.jsonl": _rows_jsonl(3)})]}, 400)
    assert error["param"] == "custom_tasks.0.files.qa.yaml:process_docs"
    assert "!function" in error["message"]
    # a folder on the offline volume is checked the same way
    error = await _refused(api_client, {"tasks": ["qa_code"], "custom_tasks": [
        {"volume_path": "tenant-tasks/runs-code"}]}, 400)
    assert error["param"] == "custom_tasks.0.files.qa.yaml:process_docs"
    # a template reaching private attributes (a Jinja sandbox escape)
    error = await _refused(api_client, {"tasks": ["qa_t"], "custom_tasks": [_upload({
        "qa.yaml": _custom_yaml("qa_t").replace(
            "doc_to_text: question_stem",
            "doc_to_text: \"{{ question_stem.__class__.__mro__ }}\""),
        "test.jsonl": _rows_jsonl(3)})]}, 400)
    assert error["param"] == "custom_tasks.0.files.qa.yaml:doc_to_text"


async def test_oversized_upload_is_refused_with_413(api_client: Callable[..., Any]) -> None:
    error = await _refused(api_client, {"tasks": ["qa_big"], "custom_tasks": [_upload({
        "qa.yaml": _custom_yaml("qa_big"), "test.jsonl": _rows_jsonl(40)})]}, 413)
    assert error["param"] == "custom_tasks.0"
    assert "max_custom_task_bytes" in error["message"]


async def test_bad_custom_yaml_and_missing_data_get_4xx_naming_the_field(
    api_client: Callable[..., Any]
) -> None:
    error = await _refused(api_client, {"tasks": ["qa_typo"], "custom_tasks": [_upload({
        "qa.yaml": _custom_yaml("qa_typo", doc_to_txt="question_stem"),
        "test.jsonl": _rows_jsonl(3)})]}, 400)
    assert error["param"] == "custom_tasks.0.files.qa.yaml:doc_to_txt"
    error = await _refused(api_client, {"tasks": ["qa_x"], "custom_tasks": [_upload({
        "qa.yaml": "task: qa_x\ndoc_to_text: [unclosed\n", "test.jsonl": _rows_jsonl(3)})]},
        400)
    assert error["param"] == "custom_tasks.0.files.qa.yaml" and "line" in error["message"]
    error = await _refused(api_client, {"tasks": ["qa_out"], "custom_tasks": [_upload({
        "qa.yaml": _custom_yaml("qa_out").replace("test: test.jsonl", "test: ../../x.jsonl"),
    })]}, 400)
    assert error["param"] == "custom_tasks.0.files.qa.yaml:dataset_kwargs.data_files"
    # a hub dataset the offline directory lacks, with the hub off: task, dataset, where
    error = await _refused(api_client, {"tasks": ["qa_hub"], "custom_tasks": [_upload({
        "qa.yaml": _custom_yaml("qa_hub").replace("dataset_path: json", "dataset_path: "
                                                   "someone/qa\ndataset_name: main")})]}, 400)
    assert error["param"] == "tasks"
    for part in ("'qa_hub'", "'someone/qa'", "someone/qa/main", "allow_online"):
        assert part in error["message"]


async def test_uploaded_custom_task_runs_on_its_own_data(
    loaded_stores: StoreSettings, sources_dir: Path, node: TestNode, smollm2_dir: Path
) -> None:
    settings = service_settings(loaded_stores, sources_dir)
    service = EvaluationService(settings)
    await service.start()
    try:
        status = await service.submit("t", wire.EvaluationRequest.model_validate({
            "endpoint": node.base_url, "model": "smollm2", "tokenizer": str(smollm2_dir),
            "tasks": ["qa_mine"], "custom_tasks": [_upload({
                "qa.yaml": _custom_yaml("qa_mine"), "test.jsonl": _rows_jsonl(5)})]}))
        assert [p.task for p in status.progress] == ["qa_mine"]
        await _wait(service, status.id)
        results = await service.results("t", status.id, samples=True)
    finally:
        await service.stop()
    assert results["results"]["qa_mine"]["sample_len"] == 5
    assert [r["doc"]["id"] for r in results["samples"]["qa_mine"]] == [
        r["id"] for r in hub_rows()[:5]]
