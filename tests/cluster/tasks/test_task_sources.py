"""Where lm-eval tasks and their data come from (no hub, no lm-eval built-in index):

- the offline data directory's layouts (the hub's shards, its parquet conversion, plain
  split files) and the error that names the task, the dataset and where it looked;
- groups as leaf tasks for the loop; custom task folders' checks; lm-eval's prompting
  options on nodes (``testbench nodes add``) and adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from task_sources import GROUP, SLICES, write_group_tasks

from cluster.cli.nodes import add_parser as add_nodes_parser
from cluster.cli.nodes import run as cmd_nodes
from cluster.core.errors import DatasetError, TaskError
from cluster.core.schemas import Node
from cluster.core.settings import Settings, TaskSourceSettings
from cluster.storage.connections import open_mongo
from cluster.tasks.lmeval import RequestSettings, TaskCatalog, plan_tasks
from cluster.tasks.lmeval.adapter import chat_template_on
from cluster.tasks.lmeval.custom import CustomTaskError, check_task_folder
from cluster.tasks.lmeval.sources import find_offline, with_data_source
from cluster.tasks.registry import leaf_task_names

HUB = {"task": "qa", "dataset_path": "someone/qa", "dataset_name": "main",
       "test_split": "test", "training_split": "train"}


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}\n")
    return path


@pytest.mark.parametrize("layout", [
    ["someone/qa/main/test-00000-of-00002.jsonl", "someone/qa/main/test-00001-of-00002.jsonl"],
    ["someone/qa/main/test/0000.jsonl"],  # the hub's parquet-conversion layout
    ["someone/qa/test.jsonl"],  # plain split files, no config folder
])
def test_offline_directory_layouts_map_to_the_tasks_dataset(tmp_path: Path,
                                                            layout: list[str]) -> None:
    files = [_touch(tmp_path / f) for f in layout]
    found, _ = find_offline(tmp_path, "someone/qa", "main")
    assert found is not None and found.builder == "json"
    assert list(found.splits["test"]) == files
    config = with_data_source("qa", dict(HUB), TaskSourceSettings(offline_data_dir=tmp_path))
    assert config["dataset_path"] == "json" and config["dataset_name"] is None
    assert config["dataset_kwargs"] == {"data_files": {"test": [str(f) for f in files]}}
    assert config["training_split"] is None  # a split the folder lacks is dropped


def test_missing_dataset_error_names_task_dataset_and_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        with_data_source("qa", dict(HUB), TaskSourceSettings(offline_data_dir=tmp_path))
    message = str(err.value)
    for part in ("'qa'", "'someone/qa'", "'main'", str(tmp_path / "someone/qa/main"),
                 "allow_online: false"):
        assert part in message
    with pytest.raises(DatasetError, match="no offline data directory is configured"):
        with_data_source("qa", dict(HUB), TaskSourceSettings())
    # online allowed: the config is left for lm-eval to read from the hub
    assert with_data_source("qa", dict(HUB), TaskSourceSettings(allow_online=True)) == HUB
    remote = {"task": "qa", "dataset_path": "json", "test_split": "test",
              "dataset_kwargs": {"data_files": {"test": "https://example.org/qa.jsonl"}}}
    with pytest.raises(DatasetError, match="https://example.org/qa.jsonl over the network"):
        with_data_source("qa", remote, TaskSourceSettings(offline_data_dir=tmp_path))
    _touch(tmp_path / "someone/qa/main/validation.jsonl")
    with pytest.raises(DatasetError, match="not the eval split 'test'"):
        with_data_source("qa", dict(HUB), TaskSourceSettings(offline_data_dir=tmp_path))


def test_code_execution_in_task_configs_is_refused_unless_allowed(tmp_path: Path) -> None:
    remote = dict(HUB, dataset_kwargs={"trust_remote_code": True})
    with pytest.raises(TaskError, match="allow_code_execution"):
        with_data_source("qa", remote, TaskSourceSettings(allow_online=True))
    with pytest.raises(TaskError, match="unsafe_code"):
        with_data_source("qa", dict(HUB, unsafe_code=True), TaskSourceSettings())
    allowed = TaskSourceSettings(allow_online=True, allow_code_execution=True)
    assert with_data_source("qa", remote, allowed) == remote


def test_groups_become_their_leaf_tasks_for_the_loop(tmp_path: Path) -> None:
    datasets = write_group_tasks(tmp_path / "datasets")
    (datasets / "signature").mkdir()
    (datasets / "signature" / "signature.yaml").write_text(
        "testbench_task: signature\nkind: signature\n")
    catalog = TaskCatalog.of(datasets)
    leaves = ["tb_head", "tb_mid", "tb_tail"]
    assert plan_tasks([GROUP], catalog).leaf_names == leaves
    assert leaf_task_names(["signature", GROUP, "tb_mid"], catalog) == ["signature", *leaves]
    with pytest.raises(TaskError, match="in both"):
        plan_tasks([GROUP, "tb_mid"], catalog)
    assert sorted(SLICES) == sorted(leaves)


def _folder(tmp_path: Path, yaml_text: str, **files: str) -> Path:
    folder = tmp_path / "custom"
    folder.mkdir(exist_ok=True)
    (folder / "t.yaml").write_text(yaml_text)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


_OK = ("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: test.jsonl\n"
       "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}}'\n"
       "doc_to_target: a\nmetric_list:\n  - metric: exact_match\n")


@pytest.mark.parametrize(("extra", "field"), [
    ("include: ../../etc/x.yaml\n", "t.yaml:include"),
    ("process_results: !function u.f\n", "t.yaml:process_results"),
    ("class: !function u.Task\n", "t.yaml:class"),
    ("filter_list:\n  - name: x\n    filter:\n      - function: custom\n",
     "t.yaml:filter_list[0].filter[0].function"),
    ("description: \"{{ q|attr('__class__') }}\"\n", "t.yaml:description"),
])
def test_custom_task_checks_name_the_field(tmp_path: Path, extra: str, field: str) -> None:
    folder = _folder(tmp_path, _OK + extra, **{"test.jsonl": "{}\n"})
    with pytest.raises(CustomTaskError) as err:
        check_task_folder(folder, TaskSourceSettings(), "custom_tasks.0")
    assert err.value.param == f"custom_tasks.0.files.{field}"


def test_custom_task_metrics_outside_lm_evals_registry_are_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, _OK.replace("exact_match", "bertscore"),
                     **{"test.jsonl": "{}\n"})
    with pytest.raises(CustomTaskError, match="evaluate") as err:
        check_task_folder(folder, TaskSourceSettings(), "custom_tasks.0")
    assert err.value.param == "custom_tasks.0.files.t.yaml:metric_list[0].metric"
    allowed = TaskSourceSettings(allow_code_execution=True)
    folder = _folder(tmp_path, _OK + "process_docs: !function u.f\n", **{"u.py": "f = id\n"})
    assert check_task_folder(folder, allowed, "custom_tasks.0") == ["t"]


def test_prompting_options_chat_endpoints_need_the_chat_template() -> None:
    assert chat_template_on("chat-completions", RequestSettings()) is True
    assert chat_template_on("completions", RequestSettings()) is False
    assert chat_template_on("completions", RequestSettings(apply_chat_template=True)) is True
    with pytest.raises(TaskError, match="apply_chat_template"):
        chat_template_on("chat-completions", RequestSettings(apply_chat_template=False))
    with pytest.raises(ValueError, match="apply_chat_template"):
        Node(node_id="c", url="http://127.0.0.1:9", model="m", api="chat-completions",
             apply_chat_template=False)


def test_nodes_add_registers_prompting_options(fresh_settings: Settings,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="testbench")
    add_nodes_parser(parser.add_subparsers(dest="cmd"))

    def add(*argv: str) -> int:
        return cmd_nodes(fresh_settings, parser.parse_args(
            ["nodes", "add", *argv, "http://127.0.0.1:9", "--model", "m",
             "--api", "chat-completions"]))

    assert add("chat-1", "--system-instruction", "Be brief.", "--no-fewshot-as-multiturn") == 0
    assert add("chat-2", "--no-apply-chat-template") == 2
    assert "apply_chat_template" in capsys.readouterr().err

    async def stored() -> list[Node]:
        async with open_mongo(fresh_settings) as mongo:
            return await mongo.nodes.list()

    (node,) = asyncio.run(stored())
    assert (node.node_id, node.system_instruction, node.fewshot_as_multiturn,
            node.apply_chat_template) == ("chat-1", "Be brief.", False, None)
    assert json.loads(node.model_dump_json())["system_instruction"] == "Be brief."


def test_sandboxed_templates_render_exactly_as_lm_evals_environment() -> None:
    """Every template renders through a sandbox (``_compat.compile_templates_once``): the
    shipped tasks' templates give lm-eval's own environment's text on every shipped row;
    private attributes are out of reach even through data."""
    import yaml
    from jinja2.exceptions import SecurityError
    from lm_eval import utils

    from cluster.core.settings import PROJECT_ROOT
    from cluster.tasks.lmeval import _compat

    sandbox = _compat._sandboxed_env()
    for task in ("openbookqa", "gsm8k"):
        config = yaml.safe_load((PROJECT_ROOT / "datasets" / task / f"{task}.yaml").read_text())
        templates = [config[k] for k in ("doc_to_text", "doc_to_target", "doc_to_choice")
                     if isinstance(config.get(k), str)]
        lines = (PROJECT_ROOT / "datasets" / task / "test.jsonl").read_text().splitlines()
        for line in lines[:200]:
            doc = json.loads(line)
            for template in templates:
                assert (sandbox.from_string(template).render(**doc)
                        == utils.env.from_string(template).render(**doc))
    with pytest.raises(SecurityError):
        sandbox.from_string("{{ q[k] }}").render(q="x", k="__class__")
