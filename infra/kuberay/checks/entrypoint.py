"""A RayJob's entrypoint, each ``python -m cluster ...`` step parsed with testbench's CLI."""

from __future__ import annotations

import contextlib
import io
import shlex

from infra.kuberay.checks.report import ErrorsAndNotes

_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ";;"}


def shell_steps(script: str) -> list[list[str]]:
    """The simple commands of a shell command line (split at ``&&``, ``||``, ``;``, ``|``)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    steps: list[list[str]] = [[]]
    for token in lexer:
        if token in _SHELL_OPERATORS:
            steps.append([])
        else:
            steps[-1].append(token)
    return [s for s in steps if s]


def entrypoint_errors(entrypoint: str, where: str, kuberay: bool = True) -> ErrorsAndNotes:
    """Parse each ``python -m cluster ...`` step of an entrypoint with the real CLI.

    With ``kuberay``, the entrypoint must be one command: KubeRay pastes it unquoted into
    the submitter pod's shell (``ray job submit ... -- <entrypoint> ; fi``), so a ``&&``
    would run the rest in the submitter pod instead of on the cluster. Wrap several steps
    in ``bash -c '...'``.
    """
    try:
        top = shell_steps(entrypoint)
    except ValueError as exc:
        return [f"{where}: entrypoint: {exc}"], []
    errors: list[str] = []
    if kuberay and len(top) > 1:
        errors.append(f"{where}: entrypoint has several shell commands; KubeRay's submitter "
                      "shell would run all but the first outside Ray: wrap them in bash -c '...'")
    steps: list[list[str]] = []
    for argv in top:
        if argv[0] in ("bash", "sh") and len(argv) >= 3 and argv[1] == "-c":
            try:
                steps.extend(shell_steps(argv[2]))
            except ValueError as exc:
                errors.append(f"{where}: entrypoint script: {exc}")
        else:
            steps.append(argv)
    try:
        from cluster.cli.main import build_parser
    except ImportError as exc:
        return errors, [f"{where}: cluster.cli.main not importable ({exc}); entrypoint not checked"]
    checked = 0
    for argv in steps:
        if argv[:3] == ["python", "-m", "cluster"]:
            args = argv[3:]
        elif argv[:1] == ["testbench"]:
            args = argv[1:]
        else:
            continue
        checked += 1
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                build_parser().parse_args(args)
            except SystemExit:
                errors.append(f"{where}: entrypoint step {shlex.join(argv)!r}: "
                              f"{stderr.getvalue().strip().splitlines()[-1]}")
    notes = [] if checked else [f"{where}: entrypoint runs no testbench command; not checked"]
    return errors, notes
