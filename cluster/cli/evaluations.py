"""``testbench eval``: an lm-eval run against one endpoint, printed as lm-eval prints it.

With ``--server URL`` the run is submitted to the evaluations API (``--token`` or
``$TESTBENCH_EVAL_TOKEN``) and followed there; without it the run executes in this process
on the bench's stores (embedded ones are started when none run), with the same runner the
API uses. Either way: a progress line on stderr, lm-eval's results table on stdout
(``lm_eval.utils.make_table``) and, with ``--output``, lm-eval's results JSON in a file.
Ctrl-C cancels the run.

Wiring (cluster/cli/main.py): ``add_eval_parser(sub)`` in ``build_parser`` and
``"eval": cmd_eval`` in ``COMMANDS``; ``eval`` must not be in ``NEEDS_STORES`` (a run on a
server needs no local stores; an in-process run starts them itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from cluster.core.errors import TestbenchError
from cluster.core.settings import Settings

TOKEN_ENV = "TESTBENCH_EVAL_TOKEN"
LOCAL_TENANT = "local"
POLL_S = 1.0


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``testbench`` subcommands; returns its parser."""
    p = subparsers.add_parser(
        "eval", help="run lm-eval tasks against an endpoint (locally or on the evaluations API)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--endpoint", required=True,
                   help="base URL of the OpenAI-compatible server (…/v1/completions accepted)")
    p.add_argument("--model", required=True, help="the model name sent in every request")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks")
    p.add_argument("--limit", type=int, default=None,
                   help="first N docs of each task's eval split (lm-eval's --limit)")
    p.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
    p.add_argument("--api", default="completions", choices=["completions", "chat-completions"])
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer path or id (default: the model name, as lm-eval)")
    p.add_argument("--gen-kwargs", default=None,
                   help="generation overrides, lm-eval style 'temperature=0,max_gen_toks=64' "
                        "or a JSON object")
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


class ProgressDisplay:
    """One status line on stderr (redrawn in place on a terminal) and log lines above it."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr  # as it is now, not at import
        self._enabled = enabled
        self._tty = self._stream.isatty()
        self._t0 = time.monotonic()
        self._last = ""

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()

    def log(self, message: str) -> None:
        if not self._enabled:
            return
        self._write(("\r\x1b[2K" if self._tty else "") + f"  {message}\n")
        if self._tty and self._last:
            self._write(self._last)

    def update(self, state: str, progress: list[tuple[str, int, int | None, int]]) -> None:
        if not self._enabled:
            return
        done = sum(d for _, d, _, _ in progress)
        total = sum(t or 0 for _, _, t, _ in progress)
        width = 24
        filled = int(width * done / total) if total else 0
        bar = "█" * filled + "░" * (width - filled)
        tasks = "  ".join(
            f"{task} {d}/{t if t is not None else '?'}" + (f" ({f} failed)" if f else "")
            for task, d, t, f in progress
        )
        pct = f"{100 * done / total:3.0f}%" if total else "  -%"
        line = f"[{time.monotonic() - self._t0:6.1f}s] {state:<9} {bar} {pct}  {tasks}"
        if line == self._last:
            return
        self._last = line
        self._write(f"\r\x1b[2K{line}" if self._tty else f"{line}\n")

    def close(self) -> None:
        if self._enabled and self._tty and self._last:
            self._write("\n")


def _request(args: argparse.Namespace) -> Any:
    from serve_apps.evaluations import protocol as wire

    return wire.EvaluationRequest.model_validate({
        "endpoint": args.endpoint, "model": args.model, "api": args.api,
        "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()],
        "num_fewshot": args.num_fewshot, "limit": args.limit,
        "gen_kwargs": parse_gen_kwargs(args.gen_kwargs), "tokenizer": args.tokenizer,
    })


# ---------------------------------------------------------------------- on a server
def run_on_server(args: argparse.Namespace, request: Any, display: ProgressDisplay
                  ) -> dict[str, Any]:
    from serve_apps.evaluations.client import EvaluationsClient

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise TestbenchError(f"--server needs a tenant token: --token or ${TOKEN_ENV}")
    client = EvaluationsClient(args.server, token)
    run_id: str | None = None
    try:
        status = client.submit(request)
        run_id = status.id
        display.log(f"submitted evaluation {run_id} to {args.server}")
        after: str | None = None
        while True:
            for key, line in client.logs(run_id, after):
                after = key
                display.log(line.message)
            display.update(status.state, [(p.task, p.done, p.total, p.failed)
                                          for p in status.progress])
            if status.state in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(POLL_S)
            status = client.status(run_id)
        for _, line in client.logs(run_id, after):
            display.log(line.message)
        if status.state != "succeeded":
            raise TestbenchError(f"evaluation {run_id} {status.state}"
                                 + (f": {status.error}" if status.error else ""))
        return client.results(run_id, samples=args.samples)
    except KeyboardInterrupt:
        if run_id is not None:
            client.cancel(run_id)
            display.log(f"cancel requested for {run_id}")
        raise
    finally:
        client.close()


# ---------------------------------------------------------------------- in this process
async def run_in_process(
    settings: Settings, request: Any, display: ProgressDisplay, samples: bool = False
) -> dict[str, Any]:
    """Execute one run here, on ``settings``' stores, exactly as an API replica would."""
    from concurrent.futures import ThreadPoolExecutor

    from cluster.evaluations.results import with_samples
    from cluster.evaluations.runner import EvaluationRunner, RelayRecorder
    from cluster.evaluations.runs import SpecError, check_spec, new_run, new_run_id
    from cluster.evaluations.spec import EvaluationSpec, RunState
    from cluster.evaluations.store import EvaluationStore
    from cluster.evaluations.worker import StoreReporter, claim_run, finish_run, new_owner_id
    from cluster.nodes.requester import Requester
    from cluster.storage.connections import StoreConnections

    spec = EvaluationSpec(
        endpoint=str(request.endpoint), model=request.model, api=request.api,
        tasks=list(request.tasks), num_fewshot=request.num_fewshot, limit=request.limit,
        gen_kwargs=dict(request.gen_kwargs), tokenizer=request.tokenizer,
    )
    try:
        check_spec(spec, settings.datasets_dir)
    except SpecError as exc:
        raise TestbenchError(f"{exc.param}: {exc}") from exc
    conns = StoreConnections(settings)
    executor = ThreadPoolExecutor(1, thread_name_prefix="lmeval")
    owner = new_owner_id()
    requester: Requester | None = None
    run_id = new_run_id()
    store: EvaluationStore | None = None
    try:
        store = EvaluationStore(await conns.mongo())
        await store.ensure_indexes()
        run = new_run(spec, LOCAL_TENANT, run_id, time.time())
        await store.create(run)
        # A lease far beyond the run: nothing else may pick an in-process run up.
        claimed = await claim_run(store, run_id, owner, time.time(), lease_s=10 * 365 * 86400.0)
        assert claimed is not None
        cfg = settings.evaluations
        requester = Requester(
            settings.requester.model_copy(update={"per_node_concurrency": cfg.per_run_concurrency}),
            RelayRecorder(store),
        )
        runner = EvaluationRunner(settings, conns, store, requester, executor)

        def on_change(current: Any) -> None:
            display.update(current.state.value, [(p.task, p.done, p.total, p.failed)
                                                 for p in current.progress])

        reporter = StoreReporter(store, run_id, owner, on_change=on_change)
        display.log(f"evaluation {run_id}: {', '.join(spec.tasks)} at {spec.endpoint}")
        try:
            results = await runner.run(claimed, reporter)
        except (asyncio.CancelledError, KeyboardInterrupt):
            await finish_run(store, run_id, owner, RunState.CANCELLED, time.time())
            raise
        except TestbenchError as exc:
            await finish_run(store, run_id, owner, RunState.FAILED, time.time(), str(exc))
            raise
        await store.save_results(run_id, results)
        await finish_run(store, run_id, owner, RunState.SUCCEEDED, time.time())
        if samples:
            results = with_samples(results, await store.samples(run_id))
        return results
    finally:
        if requester is not None:
            await requester.close()
        executor.shutdown(wait=False, cancel_futures=True)
        await conns.close()


def _in_process(settings: Settings, args: argparse.Namespace, request: Any,
                display: ProgressDisplay) -> dict[str, Any]:
    from cluster.local.bootstrap import stores_running
    from cluster.tasks.datasets import load_datasets

    with stores_running(settings) as resolved:
        # Idempotent by content hash: a no-op when the datasets are already loaded.
        asyncio.run(load_datasets(resolved, list(request.tasks)))
        return asyncio.run(run_in_process(resolved, request, display, samples=args.samples))


def cmd_eval(settings: Settings, args: argparse.Namespace) -> int:
    """``testbench eval``: 0 when the run succeeded, 1 when it did not, 2 on bad input."""
    from cluster.evaluations.results import results_table

    try:
        request = _request(args)
    except (ValidationError, ValueError) as exc:
        detail = exc.errors(include_url=False, include_input=False) if isinstance(
            exc, ValidationError) else str(exc)
        print(f"testbench: error: invalid evaluation: {detail}", file=sys.stderr)
        return 2
    display = ProgressDisplay(enabled=not args.no_progress)
    try:
        if args.server:
            results = run_on_server(args, request, display)
        else:
            results = _in_process(settings, args, request, display)
    except TestbenchError as exc:
        display.close()
        print(f"testbench: error: {exc}", file=sys.stderr)
        return 1
    display.close()
    print(results_table(results))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {args.output}", file=sys.stderr)
    return 0
