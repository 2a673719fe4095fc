"""``testbench eval``: an lm-eval run against one endpoint, printed as lm-eval prints it.

With ``--server URL`` the run is submitted to the evaluations API (``--token`` or
``$TESTBENCH_EVAL_TOKEN``) and followed there; without it the run executes in this process
on the bench's stores (embedded ones are started when none run), with the same runner the
API uses. Either way: a progress line on stderr, lm-eval's results table on stdout
(``lm_eval.utils.make_table``) and, with ``--output``, lm-eval's results JSON in a file.
Ctrl-C cancels the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster.cli.output import error
from cluster.core.errors import TestbenchError
from cluster.core.settings import Settings
from cluster.evaluations.local_run import run_here
from cluster.evaluations.results import results_table
from cluster.local.bootstrap import stores_running
from cluster.reports.progress import ProgressDisplay
from serve_apps.evaluations import protocol as wire
from serve_apps.evaluations.client import EvaluationsClient

TOKEN_ENV = "TESTBENCH_EVAL_TOKEN"
POLL_S = 1.0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``testbench`` subcommands; returns its parser."""
    p = subparsers.add_parser(
        "eval", help="run lm-eval tasks against an endpoint (locally or on the evaluations API)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    # A run on a server needs no local stores; an in-process run starts them itself.
    p.set_defaults(handler=run, needs_stores=False)
    p.add_argument("--endpoint", required=True,
                   help="base URL of the OpenAI-compatible server (…/v1/completions accepted)")
    p.add_argument("--model", required=True, help="the model name sent in every request")
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval tasks, groups or tags: the project's, "
                        "lm-eval's built-in ones, or those of --custom-task")
    p.add_argument("--limit", type=int, default=None,
                   help="first N docs of each task's eval split (lm-eval's --limit)")
    p.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
    p.add_argument("--api", default="completions", choices=["completions", "chat-completions"])
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer path or id (default: the model name, as lm-eval)")
    p.add_argument("--gen-kwargs", default=None,
                   help="generation overrides, lm-eval style 'temperature=0,max_gen_toks=64' "
                        "or a JSON object")
    p.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction,
                   default=None, help="prompts through the chat template (default: on for "
                   "chat-completions, off for completions, as lm-eval)")
    p.add_argument("--system-instruction", default=None,
                   help="prepended to every prompt (lm-eval's --system_instruction)")
    p.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction,
                   default=True, help="with a chat template, few-shot examples as turns")
    p.add_argument("--custom-task", action="append", default=[], type=Path, metavar="DIR",
                   help="upload this folder's task/group YAMLs and data files (repeatable)")
    p.add_argument("--custom-task-volume", action="append", default=[], metavar="PATH",
                   help="a task folder on the server's offline data volume (repeatable)")
    p.add_argument("--server", default=None,
                   help="evaluations API root, e.g. http://host:8000/evaluations")
    p.add_argument("--token", default=None, help=f"tenant bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--output", type=Path, default=None, help="write lm-eval's results JSON here")
    p.add_argument("--samples", action="store_true",
                   help="include lm-eval's per-sample records in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def parse_gen_kwargs(raw: str | None) -> dict[str, Any]:
    """lm-eval's ``--gen_kwargs`` syntax (``k=v,k=v``, typed as lm-eval types it) or JSON."""
    if not raw:
        return {}
    text = raw.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("--gen-kwargs JSON must be an object")
        return value
    from lm_eval.utils import simple_parse_args_string

    return dict(simple_parse_args_string(text))


def folder_upload(folder: Path) -> dict[str, str]:
    """A local task folder as an upload: relative path → base64 of every file in it."""
    if not folder.is_dir():
        raise ValueError(f"--custom-task {folder}: not a directory")
    return {path.relative_to(folder).as_posix(): base64.b64encode(path.read_bytes()).decode()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
            and not any(p.startswith(".") for p in path.relative_to(folder).parts)}


def _request(args: argparse.Namespace) -> wire.EvaluationRequest:
    custom = ([{"files": folder_upload(Path(d))} for d in args.custom_task]
              + [{"volume_path": v} for v in args.custom_task_volume])
    return wire.EvaluationRequest.model_validate({
        "endpoint": args.endpoint, "model": args.model, "api": args.api,
        "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()],
        "num_fewshot": args.num_fewshot, "limit": args.limit,
        "gen_kwargs": parse_gen_kwargs(args.gen_kwargs), "tokenizer": args.tokenizer,
        "apply_chat_template": args.apply_chat_template,
        "system_instruction": args.system_instruction,
        "fewshot_as_multiturn": args.fewshot_as_multiturn, "custom_tasks": custom,
    })


def _progress_rows(progress: list[Any]) -> list[tuple[str, int, int | None, int]]:
    return [(p.task, p.done, p.total, p.failed) for p in progress]


def _on_server(args: argparse.Namespace, request: wire.EvaluationRequest,
               display: ProgressDisplay) -> dict[str, Any]:
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise TestbenchError(f"--server needs a tenant token: --token or ${TOKEN_ENV}")
    client = EvaluationsClient(args.server, token)
    try:
        return client.follow(
            request, on_status=lambda st: display.update(
                st.state, _progress_rows(st.progress), st.overall.percent, st.overall.eta_s),
            on_log=display.log, samples=args.samples, poll_s=POLL_S)
    finally:
        client.close()


def _in_process(settings: Settings, args: argparse.Namespace, request: wire.EvaluationRequest,
                display: ProgressDisplay) -> dict[str, Any]:
    spec = request.to_spec()
    with stores_running(settings) as resolved:
        # the run loads its tasks' datasets itself (idempotent by content hash)
        return asyncio.run(run_here(
            resolved, spec,
            on_change=lambda run: display.update(
                run.state.value, _progress_rows(run.progress), run.percent, run.eta_s),
            on_log=display.log, samples=args.samples))


def run(settings: Settings, args: argparse.Namespace) -> int:
    """``testbench eval``: 0 when the run succeeded, 1 when it did not, 2 on bad input."""
    try:
        request = _request(args)
    except (ValidationError, ValueError) as exc:
        detail = exc.errors(include_url=False, include_input=False) if isinstance(
            exc, ValidationError) else str(exc)
        error(f"invalid evaluation: {detail}")
        return 2
    display = ProgressDisplay(enabled=not args.no_progress)
    try:
        if args.server:
            results = _on_server(args, request, display)
        else:
            results = _in_process(settings, args, request, display)
    except TestbenchError as exc:
        display.close()
        error(str(exc))
        return 1
    display.close()
    print(results_table(results))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {args.output}", file=sys.stderr)
    return 0
