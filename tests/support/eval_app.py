"""Helpers for the evaluations tests: the deployed app, tenants' clients, waiting for runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from cluster.core.settings import Settings

TENANTS = {
    "alice": "alice-token-0123456789abcdef",
    "bob": "bob-token-0123456789abcdef00",
    "fuzz": "fuzz-token-0123456789abcdef0",
    "carol": "carol-token-0123456789abcdef",  # no endpoint allowlist: loopback is refused
}
# The test nodes listen on loopback, which the endpoint policy refuses by default.
LOOPBACK_TENANTS = ("alice", "bob", "fuzz")
TERMINAL = {"complete", "failed", "cancelled"}


@dataclass
class EvalApp:
    name: str
    url: str
    settings: Settings
    start_s: float

    def client(self, tenant: str | None = "alice", timeout_s: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {TENANTS[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)


def wait_for(client: httpx.Client, run_id: str, states: set[str], timeout_s: float = 180.0,
             until: Any = None) -> dict[str, Any]:
    """Poll the run until its state is in ``states`` (and ``until(status)`` holds).

    Transport errors and 5xx are retried: a replica may be restarting meanwhile."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            resp = client.get(f"/v1/evaluations/{run_id}")
        except httpx.TransportError:
            resp = None
        if resp is not None and resp.status_code == 200:
            last = resp.json()
            if last["state"] in states and (until is None or until(last)):
                return last
            if last["state"] in TERMINAL and last["state"] not in states:
                raise AssertionError(f"run {run_id} ended {last['state']}: {last.get('error')}")
        time.sleep(0.25)
    raise AssertionError(f"run {run_id} not in {states} after {timeout_s}s; last: {last}")


def done_docs(status: dict[str, Any]) -> int:
    return sum(p["done"] for p in status["progress"])
