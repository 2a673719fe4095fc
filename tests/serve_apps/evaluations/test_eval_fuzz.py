"""The evaluations API's OpenAPI spec, fuzzed with schemathesis against the running app.

Schemathesis (``st run``) reads the spec the app serves and sends every operation the
spec's examples, boundary and invalid values (coverage phase) and random bodies and
parameters (fuzzing phase), with a valid tenant token; whatever they hold, the app must
answer without a server error. The fuzzed app is API only (``max_concurrent_runs: 0``), so
the runs fuzzing submits are stored and listed but never executed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from eval_app import TENANTS, EvalApp

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 25
SEED = 20240601  # reproducible: a failure can be replayed with the same command
ST = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"


def test_no_generated_request_makes_the_api_fail_with_a_server_error(
    fuzz_app: EvalApp, tmp_path: Path
) -> None:
    spec = httpx.get(f"{fuzz_app.url}/openapi.json", timeout=30).json()
    operations = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert ("POST", "/v1/evaluations") in operations and len(operations) == 11
    junit = tmp_path / "schemathesis.xml"
    run = subprocess.run(
        [ST, "run", f"{fuzz_app.url}/openapi.json", "--url", fuzz_app.url,
         "--checks", "not_a_server_error",
         "--header", f"Authorization: Bearer {TENANTS['fuzz']}",
         # One worker: hypothesis parses lambdas' source with ast.parse, which CPython 3.11
         # does not allow from two threads at once ("AST constructor recursion depth").
         "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
         "--report", "junit", "--report-junit-path", str(junit)],
        capture_output=True, text=True, timeout=300, check=False,
        cwd=tmp_path,  # schemathesis keeps a .schemathesis/ cache in its working directory
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    cases = ET.parse(junit).getroot().iter("testcase")
    tested = {case.get("name") for case in cases}
    assert len(tested) == len(operations), tested  # every operation was exercised
