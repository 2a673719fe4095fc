"""Fixtures and hooks of the fault-injection tests: each fault with its outcome, printed and documented.

Tests declare the faults they inject with ``@pytest.mark.fault("name", ...)`` and record
what they observed with the ``fault_table`` fixture. At the end of the session the table
is printed; when every fault in ``FAULTS`` ran, it is also written to
``docs/fault-injection.md`` (a partial run only prints, so the doc always shows a whole run).
"""

from __future__ import annotations

from collections.abc import Generator

import pytest
from fault_report import DOC, FAULTS, FaultTable, write_doc

from cluster.core.settings import PROJECT_ROOT

_TABLE = FaultTable()



@pytest.fixture(scope="session")
def fault_table() -> FaultTable:
    return _TABLE


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("fault"):
            for fault in mark.args:
                _TABLE.declare(fault, item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        _TABLE.finish(item.nodeid, f"**FAILED** ({report.when})")
    elif report.when == "call" and report.passed:
        _TABLE.finish(item.nodeid, "recovered")
    elif report.skipped:
        _TABLE.finish(item.nodeid, "skipped")
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TABLE.rows:
        return
    terminalreporter.section("fault injection")
    for fault in FAULTS:
        row = _TABLE.rows.get(fault)
        if row is not None:
            terminalreporter.line(f"{fault:<31} {row.outcome:<20} {row.observed}")
    for note in _TABLE.notes:
        terminalreporter.line(f"- {note}")
    if _TABLE.complete:
        write_doc(_TABLE)
        terminalreporter.line(f"written to {DOC.relative_to(PROJECT_ROOT)}")
    else:
        terminalreporter.line(f"partial run: {DOC.relative_to(PROJECT_ROOT)} left as it was")


