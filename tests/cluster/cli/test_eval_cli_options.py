"""``testbench eval``'s prompting options and custom task folders become the API request
(no run: what the CLI sends, in process or to ``--server``)."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

from cluster.cli.evaluations import _request, add_parser


def test_eval_flags_become_prompting_options_and_custom_task_uploads(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "qa.yaml").write_text("task: qa\n")
    (folder / "data" / "test.jsonl").write_bytes(b'{"q": 1}\n')
    (folder / ".hidden").write_text("x")
    parser = argparse.ArgumentParser(prog="testbench")
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args([
        "eval", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--tasks", "qa,arc_easy",
        "--apply-chat-template", "--system-instruction", "Be brief.",
        "--no-fewshot-as-multiturn", "--custom-task", str(folder),
        "--custom-task-volume", "shared/qa"])
    spec = _request(args).to_spec()
    assert (spec.apply_chat_template, spec.system_instruction, spec.fewshot_as_multiturn) == (
        True, "Be brief.", False)
    upload, volume = spec.custom_tasks
    assert {k: base64.b64decode(v) for k, v in upload.files.items()} == {
        "qa.yaml": b"task: qa\n", "data/test.jsonl": b'{"q": 1}\n'}
    assert volume.volume_path == "shared/qa" and not volume.files
    defaults = _request(parser.parse_args(["eval", "--endpoint", "http://127.0.0.1:9",
                                           "--model", "m", "--tasks", "qa"])).to_spec()
    assert (defaults.apply_chat_template, defaults.fewshot_as_multiturn) == (None, True)
