"""The ``testbench`` command line: one module per command group, assembled here.

Each group module adds its parser with ``add_parser(sub)`` and sets ``handler`` (called
with the settings and the parsed arguments) and ``needs_stores`` (start the embedded
stores for it when none are configured).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pydantic import ValidationError

from cluster.cli.output import error
from cluster.core.errors import TestbenchError
from cluster.core.settings import load_settings
from cluster.local.bootstrap import stores_running

# The command groups (modules of cluster.cli), in the order ``--help`` lists them.
GROUPS = ("local", "datasets", "nodes", "loop", "scores", "honesty", "receipts", "organic",
          "poc", "evaluations", "train")
# Each command's group: a command imports only its own group. Importing all of them cost
# ~0.8 s (lm-eval result tables, the evaluations client, the honesty stack) at the start
# of every command, ``testbench run`` included, before it reached the cluster.
COMMANDS = {"up": "local", "models": "local", "demo": "local", "datasets": "datasets",
            "nodes": "nodes", "run": "loop", "scores": "scores", "verify": "honesty",
            "receipts": "receipts", "organic": "organic", "job": "organic", "poc": "poc",
            "eval": "evaluations", "train": "train"}


def _global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="settings YAML (default: $TESTBENCH_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``command`` (one of :data:`COMMANDS`) only its group."""
    p = argparse.ArgumentParser(prog="testbench", description=__doc__.split("\n")[0])
    _global_options(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in [COMMANDS[command]] if command in COMMANDS else GROUPS:
        importlib.import_module(f"cluster.cli.{group}").add_parser(sub)
    return p


def command_of(argv: list[str]) -> str | None:
    """The command named in ``argv`` (after the global options), if any."""
    pre = argparse.ArgumentParser(add_help=False)
    _global_options(pre)
    pre.add_argument("cmd", nargs="?")
    known, _ = pre.parse_known_args(argv)
    return known.cmd


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command_of(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        settings = load_settings(args.config)
    except (ValidationError, ValueError, OSError) as exc:
        error(f"bad settings: {exc}")
        sys.exit(2)
    try:
        if args.needs_stores:
            with stores_running(settings) as resolved:
                code = args.handler(resolved, args)
        else:
            code = args.handler(settings, args)
    except TestbenchError as exc:
        error(str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    disconnect_ray()
    sys.exit(code)


def disconnect_ray() -> None:
    """Leave Ray now if a command joined it: an explicit ``ray.shutdown()`` takes about
    0.3 s, leaving it to the interpreter's exit handlers 0.6-0.9 s (measured on 2 cores),
    which every ``testbench run`` paid after its results were already on disk."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
