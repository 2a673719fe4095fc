"""The command line imports only the group of the command it runs: the map from command to
group must name every command, or that command would not parse."""

from __future__ import annotations

import argparse
import subprocess
import sys

from cluster.cli.main import COMMANDS, build_parser, command_of
from cluster.core.settings import PROJECT_ROOT


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_every_command_maps_to_the_group_that_defines_it() -> None:
    assert _commands(build_parser()) == set(COMMANDS)
    for command in COMMANDS:
        assert command in _commands(build_parser(command)), command


def test_the_command_is_found_after_the_global_options() -> None:
    assert command_of(["--config", "x.yaml", "-v", "run", "--until-full"]) == "run"
    assert command_of(["job", "run", "--node", "n1", "hi"]) == "job"
    assert command_of(["--help"]) is None
    # an unknown command still gets the full parser's error, naming the choices
    assert command_of(["nonsense"]) == "nonsense"


def test_testbench_run_does_not_import_the_other_groups() -> None:
    code = ("import sys; from cluster.cli.main import build_parser, command_of; "
            "build_parser(command_of(['run', '--until-full'])); "
            "print(sorted(m for m in sys.modules if m.startswith('cluster.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert eval(out) == ["cluster.cli.loop", "cluster.cli.main", "cluster.cli.output"]
    done = subprocess.run([sys.executable, "-m", "cluster", "nonsense"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'nonsense'" in done.stderr
