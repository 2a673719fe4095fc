"""A small synchronous client of the evaluations API (``testbench eval --server``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from cluster.core.errors import TestbenchError
from serve_apps.evaluations import protocol as wire

TERMINAL_STATES = ("complete", "failed", "cancelled")


class ApiClientError(TestbenchError):
    """The API refused a request; the message is the API's own."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


class EvaluationsClient:
    """``base_url`` is the app's root, e.g. ``http://host:8000/evaluations``."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s,
            headers={"Authorization": f"Bearer {token}"},
        )

    def close(self) -> None:
        self._http.close()

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code < 400:
            return resp
        try:
            message = wire.ErrorResponse.model_validate(resp.json()).error.message
        except (ValueError, TypeError):
            message = resp.text[:500] or resp.reason_phrase
        raise ApiClientError(resp.status_code, message)

    def submit(self, request: wire.EvaluationRequest) -> wire.EvaluationStatus:
        body = request.model_dump(mode="json", exclude_none=True)
        resp = self._check(self._http.post("/v1/evaluations", json=body))
        return wire.EvaluationStatus.model_validate(resp.json())

    def status(self, run_id: str) -> wire.EvaluationStatus:
        resp = self._check(self._http.get(f"/v1/evaluations/{run_id}"))
        return wire.EvaluationStatus.model_validate(resp.json())

    def cancel(self, run_id: str) -> wire.EvaluationStatus:
        resp = self._check(self._http.delete(f"/v1/evaluations/{run_id}"))
        return wire.EvaluationStatus.model_validate(resp.json())

    def suspend(self, run_id: str) -> wire.EvaluationStatus:
        resp = self._check(self._http.post(f"/v1/evaluations/{run_id}/suspend"))
        return wire.EvaluationStatus.model_validate(resp.json())

    def resume(self, run_id: str) -> wire.EvaluationStatus:
        resp = self._check(self._http.post(f"/v1/evaluations/{run_id}/resume"))
        return wire.EvaluationStatus.model_validate(resp.json())

    def results(self, run_id: str, samples: bool = False) -> dict[str, Any]:
        resp = self._check(self._http.get(
            f"/v1/evaluations/{run_id}/results", params={"samples": str(samples).lower()}
        ))
        return dict(resp.json())

    def follow(
        self,
        request: wire.EvaluationRequest,
        on_status: Callable[[wire.EvaluationStatus], None] = lambda status: None,
        on_log: Callable[[str], None] = lambda line: None,
        samples: bool = False,
        poll_s: float = 1.0,
    ) -> dict[str, Any]:
        """Submit ``request``, follow its status and log lines until it ends, and return
        lm-eval's results JSON. A failed or cancelled run raises :class:`TestbenchError`;
        Ctrl-C cancels the run on the server before it propagates."""
        run_id: str | None = None
        try:
            status = self.submit(request)
            run_id = status.id
            on_log(f"submitted evaluation {run_id}")
            after: str | None = None
            while True:
                for key, line in self.logs(run_id, after):
                    after = key
                    on_log(line.message)
                on_status(status)
                if status.state in TERMINAL_STATES:
                    break
                time.sleep(poll_s)
                status = self.status(run_id)
            for _, line in self.logs(run_id, after):
                on_log(line.message)
            if status.state != "complete":
                raise TestbenchError(f"evaluation {run_id} {status.state}"
                                     + (f": {status.error}" if status.error else ""))
            return self.results(run_id, samples=samples)
        except KeyboardInterrupt:
            if run_id is not None:
                self.cancel(run_id)
                on_log(f"cancel requested for {run_id}")
            raise

    def logs(self, run_id: str, after: str | None = None) -> list[tuple[str, wire.LogEvent]]:
        """The log lines after event id ``after`` (no waiting), as (event id, line)."""
        headers = {"Last-Event-ID": after} if after else {}
        resp = self._check(self._http.get(
            f"/v1/evaluations/{run_id}/logs", params={"follow": "false"}, headers=headers
        ))
        return [(eid, wire.LogEvent.model_validate_json(data))
                for event, eid, data in parse_sse(resp.text) if event == "log" and eid]


def parse_sse(text: str) -> list[tuple[str, str | None, str]]:
    """Server-sent events as (event, id, data); comments and keep-alives dropped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, event_id, data = "message", None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "id":
                event_id = value
            elif name == "data":
                data.append(value)
        if data:
            events.append((event, event_id, "\n".join(data)))
    return events
