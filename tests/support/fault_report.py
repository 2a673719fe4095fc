"""The fault-injection report: each fault, how it is injected, and what a run observed.

Filled by the tests marked ``fault`` (through the ``fault_table`` fixture of its
conftest) and written to ``docs/fault-injection.md`` after a whole run.
"""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import dataclass

from cluster.core.settings import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs" / "fault-injection.md"

# Every fault the suite injects, in the order of the report, with how it is injected.
FAULTS: dict[str, str] = {
    "sampler killed": "`ray.kill` of a Sampler actor (restarts, calls retried)",
    "requester killed": "`ray.kill` of the Requester actor mid-relay",
    "evaluator killed": "`ray.kill` of an Evaluator actor mid-scoring",
    "manager killed": "`ray.kill` of the detached Manager (restarts, rebuilds from MongoDB)",
    "postgresql stopped": "the loop's PostgreSQL server stopped ~6 s, restarted on its port",
    "mongodb stopped": "the loop's MongoDB server stopped ~12 s (past the client's 10 s "
                       "server selection), restarted on its port",
    "worker node lost": "`ray.cluster_utils.Cluster` of two nodes: the one hosting the Manager "
                        "(drawing and scoring in its process) and the Requester removed "
                        "mid-run, no grace",
    "node hangs": "test node never answers",
    "node drips slowly": "200 headers, then one body byte every 0.25 s",
    "node sends 100 MB": "200 with a 100 MB streamed body (cap 8 MiB)",
    "node sends invalid JSON": "200 `application/json` with a truncated body",
    "node sends wrong content type": "200 `text/html` error page",
    "node resets connections": "TCP RST (SO_LINGER 0) after reading the request",
}


@dataclass
class FaultRow:
    fault: str
    test: str
    observed: str = ""
    outcome: str = "not run"


class FaultTable:
    def __init__(self) -> None:
        self.rows: dict[str, FaultRow] = {}
        self.notes: list[str] = []

    def declare(self, fault: str, test: str) -> None:
        if fault not in FAULTS:
            raise KeyError(f"unknown fault {fault!r}: add it to FAULTS in tests/support/fixtures_faults.py")
        self.rows[fault] = FaultRow(fault, test)

    def record(self, fault: str, observed: str) -> None:
        """What the test saw after injecting ``fault`` (counts, codes, recovery time)."""
        self.rows[fault].observed = observed

    def note(self, text: str) -> None:
        """A line about a whole run rather than one fault (printed below the table)."""
        self.notes.append(text)

    def finish(self, test: str, outcome: str) -> None:
        for row in self.rows.values():
            if row.test == test and row.outcome == "not run":
                row.outcome = outcome

    def markdown(self) -> str:
        lines = ["| fault | injected as | outcome | observed |", "|---|---|---|---|"]
        for fault, how in FAULTS.items():
            row = self.rows.get(fault)
            outcome = row.outcome if row else "not run"
            observed = (row.observed if row else "").replace("|", "\\|")
            lines.append(f"| {fault} | {how} | {outcome} | {observed} |")
        if self.notes:
            lines += ["", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines)

    @property
    def complete(self) -> bool:
        return all(f in self.rows and self.rows[f].outcome != "not run" for f in FAULTS)



def write_doc(table: FaultTable) -> None:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    DOC.write_text(f"""# Fault injection

What the measuring loop survives, proven by the tests marked `fault`.
After every fault the suite checks, from what MongoDB holds, that **no sample was lost or
duplicated** (every prompt has exactly one relay and its sample; one sample per
(node, task, doc, epoch)), that node failures were **recorded with their error code**, and
that the loop **recovered without an operator** (it went on to fill every buffer).

Run it (about 4 minutes on a 2-core machine; every test is marked `slow`):

```bash
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider -m fault tests
```

The table below is rewritten by the suite whenever all of it runs
(last: {when}, {platform.machine()}, Python {platform.python_version()}).

{table.markdown()}

The Sampler and Evaluator kills run with one actor of each (`pools.samplers` and
`pools.evaluators` 1, `tests/support/fault_loop.py::fault_settings`); the lost worker node
runs the default layout, where the Manager's own process draws and scores, so the docs
being drawn and scored there are lost with it.
""")
