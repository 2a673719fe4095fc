"""The outer sync between MLNodes: push our signed pseudo-gradient to every peer, gather
theirs, for one outer step at a time.

Receiving (``receive``): :class:`~cluster.auth.sync_messages.SyncMessageVerifier` checks
the message before anything is parsed, then the inbox refuses replays (a second message of
a sender for a step, or one for a step behind ours). An accepted message is written to the
run's directory before the sender hears "accepted", so a node that is killed and restarted
on the same directory still has every message its peers delivered (and refuses them again
as replays). Our own message for a step is kept the same way: a resumed node sends, and
averages, exactly what its peers already have.

Sending (``exchange``): one delivery task per peer retries until the peer accepts, answers
that it already holds our message (``replayed``), refuses for good, or the step's deadline
passes; the gather waits until every expected peer's message is in or the deadline passes.
A peer that missed a step is reported ``unresponsive`` and not waited for in later steps
until a message of it arrives again. With fewer than ``min_nodes`` nodes (this one
included) at the deadline the step fails with :class:`SyncFailed`.

Peers' URLs come from the run's start request: :class:`HttpSyncSender` sends only where the
endpoint policy allows (``cluster/nodes/policy.py``; the MLNode's ``training.peer_allowlist``).
A peer whose URL it refuses is never sent anything: it is ``refused`` at once, its
``last_error`` saying why, and the step goes on with the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import aiohttp
from pydantic import BaseModel, ConfigDict

from cluster.auth.keys import Ed25519Key
from cluster.auth.sync_messages import (
    SyncEnvelope,
    SyncMessageVerifier,
    SyncProblem,
    SyncRefused,
    refusal_from_answer,
    sign_sync_message,
)
from cluster.core.errors import NodeError, TestbenchError
from cluster.nodes.policy import EndpointGuard, EndpointRefusedError
from cluster.nodes.transport import NodeTransport
from cluster.train.config import TrainRunConfig

log = logging.getLogger(__name__)

SYNC_ROUTE = "/api/v1/train/sync"
PeerState = Literal["waiting", "ok", "unresponsive", "refused"]


class SyncFailed(TestbenchError):
    """Too few nodes answered an outer step (or a peer refused us for good)."""


class SyncStopped(SyncFailed):
    """The run was asked to stop while it waited for its peers."""


class PeerStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public_key: str
    url: str
    state: PeerState = "waiting"
    last_sync_step: int | None = None
    last_sync_at: float | None = None
    last_error: str | None = None
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class SyncResult:
    """The messages of one outer step: sender key -> body (ours included)."""

    outer_step: int
    payloads: dict[str, bytes]
    missing: list[str] = field(default_factory=list)


class SyncSender(Protocol):
    async def send(self, url: str, headers: Mapping[str, str], body: bytes,
                   timeout_s: float) -> tuple[int, bytes]:
        """POST ``body``; (status, answer body). Raises :class:`NodeError` when no answer
        came."""
        ...

    async def close(self) -> None: ...


class HttpSyncSender:
    """Sync messages over HTTP through the node transport (no redirects, capped answers),
    every connection under ``guard``'s endpoint policy (default: public addresses only)."""

    def __init__(self, connect_timeout_s: float = 10.0,
                 guard: EndpointGuard | None = None) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._guard = EndpointGuard.of() if guard is None else guard
        self._transport: NodeTransport | None = None

    async def send(self, url: str, headers: Mapping[str, str], body: bytes,
                   timeout_s: float) -> tuple[int, bytes]:
        if self._transport is None:
            self._transport = NodeTransport.open(size_cap=64 * 1024, max_connections=16,
                                                 guard=self._guard)
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._connect_timeout_s)
        answer = await self._transport.exchange_bytes(
            "POST", url, body, timeout,
            headers={**headers, "Content-Type": "application/octet-stream"})
        return answer.status, answer.body

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
            self._transport = None


def _give_up(peer: PeerStatus, why: str) -> None:
    """A peer that will not take this step's message (it refused it, or the endpoint policy
    refused its address): marked ``refused`` at once, never retried."""
    peer.state = "refused"
    peer.last_error = why
    log.warning("train.sync.refused peer=%s reason=%s", peer.public_key[:16], why)


def wire_bytes(headers: Mapping[str, str], body: bytes) -> int:
    """Bytes of a message on the wire: its body and the sync headers (HTTP's own request
    line and default headers, ~150 bytes, and TCP/IP framing not counted)."""
    return len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items())


async def send_sync_message(sender: SyncSender, peer_url: str, headers: Mapping[str, str],
                            body: bytes, timeout_s: float = 60.0) -> int:
    """Deliver one message to a peer; its HTTP status when accepted. Raises
    :class:`SyncRefused` (what the peer said) or :class:`NodeError` (no answer)."""
    status, answer = await sender.send(peer_url.rstrip("/") + SYNC_ROUTE, headers, body,
                                       timeout_s)
    if 200 <= status < 300:
        return status
    raise refusal_from_answer(status, answer)


class MessageStore:
    """Accepted messages and our own, one file pair per (step, sender), under ``root``."""

    def __init__(self, root: Path) -> None:
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.outbox.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def inbox_path(self, step: int, sender: str) -> Path:
        return self.inbox / f"{step:09d}-{sender}.body"

    def put_inbox(self, step: int, sender: str, headers: Mapping[str, str], body: bytes) -> None:
        import json

        self._write(self.inbox_path(step, sender).with_suffix(".headers"),
                    json.dumps(dict(headers)).encode())
        self._write(self.inbox_path(step, sender), body)

    def inbox_entries(self) -> list[tuple[dict[str, str], Path]]:
        import json

        out = []
        for body in sorted(self.inbox.glob("*.body")):
            head = body.with_suffix(".headers")
            if head.is_file():
                out.append((json.loads(head.read_text()), body))
        return out

    def outbox_path(self, step: int) -> Path:
        return self.outbox / f"{step:09d}.body"

    def put_outbox(self, step: int, body: bytes) -> None:
        self._write(self.outbox_path(step), body)

    def prune(self, before_step: int) -> None:
        for directory in (self.inbox, self.outbox):
            for f in directory.iterdir():
                try:
                    step = int(f.name[:9])
                except ValueError:
                    continue
                if step < before_step:
                    f.unlink(missing_ok=True)


class PeerExchange:
    """One node's side of the outer sync of one training run (async, one event loop)."""

    def __init__(
        self,
        run: TrainRunConfig,
        key: Ed25519Key,
        store_dir: Path,
        sender: SyncSender,
        max_message_bytes: int,
        clock: Callable[[], float] = time.time,
        retry_s: float = 0.5,
    ) -> None:
        self.run = run
        self._key = key
        self._sender = sender
        self._clock = clock
        self._retry_s = retry_s
        self._verifier = SyncMessageVerifier(run.run_id, [p.public_key for p in run.peers],
                                             max_message_bytes)
        self._peers = {p.public_key: PeerStatus(public_key=p.public_key, url=p.url)
                       for p in run.peers}
        self._store = MessageStore(store_dir)
        self._received: dict[tuple[int, str], Path] = {}
        self._excluded: set[str] = set()
        self._step = 0
        self._changed: asyncio.Condition | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._stopped = False
        for headers, body_path in self._store.inbox_entries():
            try:  # written only after these same checks; re-checked all the same
                env = self._verifier.verify(headers, body_path.read_bytes())
            except SyncRefused as exc:
                log.warning("train.inbox.dropped file=%s reason=%s", body_path.name, exc)
                continue
            self._received[(env.outer_step, env.sender)] = body_path

    @property
    def public_key(self) -> str:
        return self._key.public_key

    @property
    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # bound to the loop that first waits
            self._changed = asyncio.Condition()
        return self._changed

    def peers(self) -> list[PeerStatus]:
        return [p.model_copy() for p in self._peers.values()]

    def set_step(self, outer_step: int) -> None:
        """The outer step this node works on: older messages are replays from now on."""
        self._step = outer_step
        self._received = {k: v for k, v in self._received.items() if k[0] >= outer_step}
        self._store.prune(outer_step - 1)

    # ---- receiving -----------------------------------------------------------------------
    async def receive(self, headers: Mapping[str, str], body: bytes) -> SyncEnvelope:
        """Accept a peer's message (lowercase ``headers``) or raise :class:`SyncRefused`."""
        env = self._verifier.verify(headers, body)
        if env.outer_step < self._step:
            raise SyncRefused(SyncProblem.REPLAYED,
                              f"outer step {env.outer_step} is behind this node's step "
                              f"{self._step}")
        if (env.outer_step, env.sender) in self._received:
            raise SyncRefused(SyncProblem.REPLAYED,
                              f"this node already holds the message of {env.sender[:16]}... "
                              f"for outer step {env.outer_step}")
        signed = {h: headers[h] for h in headers if h.startswith("x-testbench-train-")}
        await asyncio.to_thread(self._store.put_inbox, env.outer_step, env.sender, signed, body)
        self._received[(env.outer_step, env.sender)] = self._store.inbox_path(env.outer_step,
                                                                              env.sender)
        peer = self._peers[env.sender]
        peer.messages_received += 1
        peer.bytes_received += len(body)
        peer.state = "ok"
        peer.last_error = None
        self._excluded.discard(env.sender)
        async with self._cond:
            self._cond.notify_all()
        return env

    # ---- sending and gathering -----------------------------------------------------------
    async def exchange(self, outer_step: int, payload: bytes) -> SyncResult:
        """Send our ``payload`` for ``outer_step`` to every peer and gather theirs."""
        self.set_step(outer_step)
        own = self._store.outbox_path(outer_step)
        if own.is_file():  # a resumed node: what the peers may already hold
            kept = own.read_bytes()
            if kept != payload:
                log.warning("train.sync.resent_kept_payload step=%d", outer_step)
            payload = kept
        else:
            await asyncio.to_thread(self._store.put_outbox, outer_step, payload)
        headers = sign_sync_message(self._key, self.run.run_id, outer_step, payload)
        deadline = self._clock() + self.run.sync_timeout_s
        for peer in self._peers.values():
            task = asyncio.ensure_future(self._deliver(peer, outer_step, headers, payload,
                                                       deadline))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        expected = [k for k in self._peers if k not in self._excluded]

        def have(k: str) -> bool:
            return (outer_step, k) in self._received

        def done() -> bool:
            present = 1 + sum(have(k) for k in self._peers)
            return self._stopped or (all(have(k) for k in expected)
                                     and present >= self.run.required_nodes)

        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(done),
                                       timeout=max(0.0, deadline - self._clock()))
            except TimeoutError:
                pass
        if self._stopped:
            raise SyncStopped("the training run was stopped")
        missing = [k for k in self._peers if not have(k)]
        for k in missing:
            peer = self._peers[k]
            if peer.state != "refused":
                peer.state = "unresponsive"
            peer.last_error = (f"no message for outer step {outer_step} within "
                               f"{self.run.sync_timeout_s:g} s"
                               + (f" (sending to it: {peer.last_error})" if peer.last_error else ""))
            self._excluded.add(k)
        present = 1 + len(self._peers) - len(missing)
        if present < self.run.required_nodes:
            detail = "; ".join(f"{k[:16]}... at {self._peers[k].url}: {self._peers[k].last_error}"
                               for k in missing)
            raise SyncFailed(f"outer step {outer_step}: {present} of {self.run.node_count} nodes "
                             f"took part, the run needs {self.run.required_nodes} "
                             f"(min_nodes); missing: {detail}")
        now = self._clock()
        payloads = {self.public_key: payload}
        for k in self._peers:
            if have(k):
                payloads[k] = await asyncio.to_thread(self._received[(outer_step, k)].read_bytes)
                self._peers[k].last_sync_step = outer_step
                self._peers[k].last_sync_at = now
        return SyncResult(outer_step=outer_step, payloads=payloads, missing=missing)

    async def _deliver(self, peer: PeerStatus, step: int, headers: Mapping[str, str],
                       body: bytes, deadline: float) -> None:
        size = wire_bytes(headers, body)
        while not self._stopped:
            left = deadline - self._clock()
            if left <= 0:
                return
            try:
                await send_sync_message(self._sender, peer.url, headers, body,
                                        timeout_s=max(1.0, left))
                peer.messages_sent += 1
                peer.bytes_sent += size
                return
            except SyncRefused as refused:
                peer.bytes_sent += size
                if refused.problem == SyncProblem.REPLAYED:
                    return  # it already holds our message for this step
                if refused.problem != SyncProblem.NOT_TRAINING:
                    _give_up(peer, f"refused our message for step {step}: {refused}")
                    return
                if self._clock() < deadline:
                    peer.last_error = f"not training yet: {refused.detail}"
            except NodeError as exc:  # no answer (NodeUnavailable): it may be restarting
                if isinstance(exc.__cause__, EndpointRefusedError):  # nothing was sent
                    _give_up(peer, f"not sent our message for step {step}: {exc}")
                    return
                # past the deadline the step has judged this peer (``exchange`` wrote why,
                # quoting this error): a late answer must not overwrite that verdict
                if self._clock() < deadline:
                    peer.last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(min(self._retry_s, max(0.0, deadline - self._clock())))

    def failed_payload(self, sender: str, step: int, error: str) -> None:
        """A worker could not use a peer's message (not a pseudo-gradient of this model)."""
        peer = self._peers.get(sender)
        if peer is not None:
            peer.state = "refused"
            peer.last_error = f"its message for outer step {step} was unusable: {error}"
            self._excluded.add(sender)

    async def close(self) -> None:
        self._stopped = True
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()
        tasks = list(self._deliveries)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._sender.close()

    def stop(self) -> None:
        """Wake anything waiting in :meth:`exchange` (it raises :class:`SyncFailed`)."""
        self._stopped = True
        if self._changed is not None:
            asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
