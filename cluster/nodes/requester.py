"""Requester: sends prompts to untrusted nodes and turns every outcome into a Relay.

The throughput hot path of the measuring loop. A plain class; ``ray.remote`` is applied in
``actors/remote.py`` (an async actor). Each attempt is one exchange of the node transport
(``cluster/nodes/transport.py``: size cap, no redirects, typed failures), whose one
aiohttp session is reused for everything; a per-node and a global semaphore bound concurrency across all concurrent
``relay()`` calls, taken in that order so a node's waiting prompts never hold a global
slot. Within a call, a few workers per node pull that node's prompts (no task per
prompt). Each prompt yields exactly one Relay, in order:

- 2xx with a JSON object body → ``OK`` (the object is the relay's ``response``);
- anything the node does wrong → ``NODE`` with ``status`` and ``error``: timeouts,
  refused or reset connections, non-2xx statuses, bodies that are not a JSON object,
  bodies above ``response_size_cap_bytes``;
- a bug on our side → ``RELAY``; a prompt whose node is not given → ``BAD_PARAMS``.

Retries (up to ``max_retries``, exponential backoff with jitter) happen only where a retry
is correct: connection failures before any response arrived, and HTTP 429/502/503/504.
Never after a sent request timed out, never on 500, invalid JSON or an oversize body.

Coalescing (``coalesce_prompts`` > 1, off by default): a node's prompts queue in one
per-node queue shared by all ``relay()`` calls; whoever gets one of the node's slots takes
the oldest prompt and up to ``coalesce_prompts`` prompt items compatible with it (same
path, same body apart from ``prompt``) and posts them as one ``/v1/completions`` body, the
prompt-list form lm-eval itself posts at ``batch_size`` > 1. The answer's choices are split
back by ``index`` into one relay per prompt. Prompts only wait for slots they would wait
for anyway: an idle node gets single-prompt bodies, a busy one gets fewer, larger ones.

Endpoint policy: every connection obeys an :class:`~cluster.nodes.policy.EndpointGuard`,
the Requester's own (``endpoint_allowlist`` of its settings) or one given per ``relay()``
call (the evaluation service passes each tenant's). Each guard has a transport of its own,
so no connection or resolved address is shared between policies. Names resolve through
the guard to checked addresses only (no DNS rebinding); a refused endpoint is a ``NODE``
relay whose error says why, and nothing is sent to it.

Timing: ``ttft_s`` is the time to the response headers and ``latency_s`` the time to the
end of the body, both of the final attempt; ``started_at``/``finished_at`` bracket all
attempts (from the first send, after the concurrency slots were acquired).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from yarl import URL

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node, Prompt, Relay
from cluster.core.settings import RequesterSettings
from cluster.core.sla import SlaTimeout
from cluster.nodes.policy import EndpointGuard
from cluster.nodes.transport import NodeBytes, NodeTransport, NodeUnavailable, dumps_json
from cluster.wire import openai as wire

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class RelaySink(Protocol):
    """Where relays are recorded (MongoDB in production) before ``relay`` returns them."""

    async def record_relays(self, relays: list[Relay]) -> None: ...


@dataclass(slots=True)
class _Attempt:
    """The outcome of one HTTP attempt."""

    code: ErrorCode
    status: int | None = None
    error: str | None = None
    response: dict[str, Any] | None = None
    retryable: bool = False
    retry_after_s: float | None = None
    ttft_s: float | None = None
    latency_s: float | None = None


def _malformed(exc: wire.MalformedAnswer) -> _Attempt:
    return _Attempt(
        ErrorCode.NODE, exc.status, str(exc), ttft_s=exc.ttft_s, latency_s=exc.latency_s
    )


@dataclass(slots=True)
class _Call:
    """One ``relay()`` call's prompts still without a relay (coalescing only)."""

    remaining: int


@dataclass(slots=True)
class _Queued:
    """A prompt waiting in its node's queue for a coalesced body."""

    prompt: Prompt
    items: list[Any] | None  # the body's prompt as a list of prompt items; None = alone
    key: bytes | None  # what must be equal for two prompts to share a body
    call: _Call
    future: asyncio.Future[Relay] = field(repr=False)

    def resolve(self, relay: Relay) -> None:
        if not self.future.done():
            self.future.set_result(relay)
            self.call.remaining -= 1


def _coalescing_key(prompt: Prompt) -> tuple[list[Any] | None, bytes | None]:
    if prompt.path != wire.COMPLETIONS_PATH:
        return None, None
    batchable = wire.batchable_prompts(prompt.body)
    if batchable is None:
        return None, None
    items, rest = batchable
    return items, dumps_json(rest)


class RequesterObserver(Protocol):
    """What the Requester reports as it works (the loop plugs its metrics in here)."""

    def queue_changed(self, pending: int, in_flight: int) -> None: ...

    def relays_done(self, relays: Sequence[Relay]) -> None: ...


class _Unobserved:
    def queue_changed(self, pending: int, in_flight: int) -> None:
        pass

    def relays_done(self, relays: Sequence[Relay]) -> None:
        pass


class Requester:
    """Relays prompts to nodes under concurrency limits and SLA timeouts."""

    def __init__(
        self,
        settings: RequesterSettings,
        relay_sink: RelaySink | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        observer: RequesterObserver | None = None,
        *,
        guard: EndpointGuard | None = None,
        quote_bodies: bool = True,
    ) -> None:
        self.settings = settings
        self.guard = guard or EndpointGuard.of(settings.endpoint_allowlist)
        self._quote_bodies = quote_bodies
        self._sink = relay_sink
        self._observer: RequesterObserver = observer or _Unobserved()
        self._clock = clock
        self._rng = rng or random.Random(0)
        self._sla = SlaTimeout(settings.sla)
        # guard id -> (guard, its transport); all on the event loop ``_loop``
        self._transports: dict[int, tuple[EndpointGuard, NodeTransport]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._global = asyncio.Semaphore(settings.global_concurrency)
        self._node_slots: dict[str, asyncio.Semaphore] = {}
        self._urls: dict[tuple[str, str], URL] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._by_code: Counter[str] = Counter()
        self._in_flight = 0
        self._pending = 0
        self._attempts = 0
        self._retries = 0
        self._queues: dict[str, deque[_Queued]] = {}  # coalescing only
        self._bodies_coalesced = 0
        self._prompts_coalesced = 0

    # -- public -------------------------------------------------------------------------

    async def relay(
        self,
        prompts: Sequence[Prompt],
        nodes: dict[str, Node],
        guard: EndpointGuard | None = None,
    ) -> list[Relay]:
        """One Relay per prompt, in order. Node misbehaviour never raises.

        The relays are recorded through the sink (if any) before they are returned; a
        failing sink raises, since the relays would otherwise be lost. ``guard``: the
        endpoint policy of this call's connections (default: the Requester's own).
        """
        if not prompts:
            return []
        transport = self._ensure_transport(guard or self.guard)
        t0 = time.perf_counter()
        slots: list[Relay | None] = [None] * len(prompts)
        by_node: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_node.setdefault(prompt.node_id, []).append(i)
        # A few workers per node (not one task per prompt): each pulls the node's next
        # prompt, so a node's backlog neither creates tasks nor holds global slots.
        workers = []
        waiting: list[tuple[int, asyncio.Future[Relay]]] = []
        queued: list[tuple[deque[_Queued], _Call]] = []
        coalesce = self.settings.coalesce_prompts > 1
        for node_id, indexes in by_node.items():
            node = nodes.get(node_id)
            if coalesce and node is not None:
                queue = self._queues.setdefault(node_id, deque())
                loop = asyncio.get_running_loop()
                call = _Call(len(indexes))
                queued.append((queue, call))
                for i in indexes:
                    items, key = _coalescing_key(prompts[i])
                    entry = _Queued(prompts[i], items, key, call, loop.create_future())
                    queue.append(entry)
                    waiting.append((i, entry.future))
                n_workers = min(self.settings.per_node_concurrency, len(indexes))
                workers += [
                    self._coalescing_worker(transport, queue, node, call) for _ in range(n_workers)
                ]
                continue
            pulled = iter(indexes)
            n_workers = min(self.settings.per_node_concurrency, len(indexes))
            workers += [
                self._worker(transport, pulled, prompts, node, slots) for _ in range(n_workers)
            ]
        self._pending += len(prompts)
        self._observer.queue_changed(self._pending, self._in_flight)
        try:
            await asyncio.gather(*workers)
            # Our workers stop when the node's queue is empty; prompts of ours that another
            # call's worker took are still in flight there.
            for i, future in waiting:
                slots[i] = await future
        except BaseException:
            # Cancelled: prompts of ours still queued would wait forever for workers.
            for queue, call in queued:
                if call.remaining > 0:
                    kept = [e for e in queue if e.call is not call]
                    queue.clear()
                    queue.extend(kept)
            raise
        finally:
            self._pending -= len(prompts)
            self._observer.queue_changed(self._pending, self._in_flight)
        relays = [
            r if r is not None else self._lost(prompts[i], "no relay was produced")
            for i, r in enumerate(slots)
        ]
        if self._sink is not None:
            await self._sink.record_relays(relays)
        self._observer.relays_done(relays)
        if log.isEnabledFor(logging.DEBUG):  # per call: the loop makes one call per doc
            codes = Counter(r.error_code.name for r in relays)
            log.debug(
                "relay_batch_done prompts=%d nodes=%d seconds=%.3f %s",
                len(relays),
                len({p.node_id for p in prompts}),
                time.perf_counter() - t0,
                " ".join(f"{name.lower()}={n}" for name, n in sorted(codes.items())),
            )
        return relays

    async def close(self) -> None:
        transports, self._transports = self._transports, {}
        for _, transport in transports.values():
            await transport.close()

    def stats(self) -> dict[str, Any]:
        """Counters since start: relays by error code, attempts, retries, in flight."""
        return {
            "relays": sum(self._by_code.values()),
            "by_code": dict(self._by_code),
            "attempts": self._attempts,
            "retries": self._retries,
            "in_flight": self._in_flight,
            "pending": self._pending,
            "bodies_coalesced": self._bodies_coalesced,
            "prompts_coalesced": self._prompts_coalesced,
        }

    # -- internals ----------------------------------------------------------------------

    def _ensure_transport(self, guard: EndpointGuard) -> NodeTransport:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new event loop (asyncio.run again): sessions and semaphores of the old one
            # cannot be used here.
            self._loop = loop
            self._transports = {}
            if self._pending == 0:
                self._global = asyncio.Semaphore(self.settings.global_concurrency)
                self._node_slots.clear()
                self._queues.clear()
        entry = self._transports.get(id(guard))
        if entry is None or entry[1].closed:
            s = self.settings
            transport = NodeTransport.open(
                size_cap=s.response_size_cap_bytes, max_connections=s.global_concurrency,
                guard=guard, quote_bodies=self._quote_bodies,
            )
            entry = self._transports[id(guard)] = (guard, transport)
        return entry[1]

    def _node_slot(self, node_id: str) -> asyncio.Semaphore:
        slot = self._node_slots.get(node_id)
        if slot is None:
            slot = self._node_slots[node_id] = asyncio.Semaphore(
                self.settings.per_node_concurrency
            )
        return slot

    def _url(self, node: Node, path: str) -> URL:
        key = (node.base_url, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(node.base_url + path)
        return url

    def _relay_of(
        self,
        prompt: Prompt,
        code: ErrorCode,
        started_at: float,
        finished_at: float,
        attempts: int,
        status: int | None = None,
        error: str | None = None,
        response: dict[str, Any] | None = None,
        latency_s: float | None = None,
        ttft_s: float | None = None,
    ) -> Relay:
        self._by_code[code.name] += 1
        # Every field is built here with its declared type: skip re-validating (hot path).
        return Relay.model_construct(
            prompt_id=prompt.prompt_id,
            sample_key=prompt.sample_key,
            node_id=prompt.node_id,
            task=prompt.task,
            doc_id=prompt.doc_id,
            request_index=prompt.request_index,
            error_code=code,
            status=status,
            error=error,
            response=response,
            latency_s=latency_s,
            ttft_s=ttft_s,
            attempts=attempts,
            started_at=started_at,
            finished_at=finished_at,
        )

    async def _worker(
        self,
        transport: NodeTransport,
        queue: Iterator[int],
        prompts: Sequence[Prompt],
        node: Node | None,
        slots: list[Relay | None],
    ) -> None:
        for i in queue:
            slots[i] = await self._relay_one(transport, prompts[i], node)

    def _lost(self, prompt: Prompt, why: str) -> Relay:
        now = self._clock()
        return self._relay_of(prompt, ErrorCode.RELAY, now, now, 0, error=f"internal error: {why}")

    async def _relay_one(
        self, transport: NodeTransport, prompt: Prompt, node: Node | None
    ) -> Relay:
        started_at = self._clock()
        try:
            if node is None:
                return self._relay_of(
                    prompt,
                    ErrorCode.BAD_PARAMS,
                    started_at,
                    started_at,
                    0,
                    error=f"node {prompt.node_id!r} is not among the nodes given to relay()",
                )
            url = self._url(node, prompt.path)
            data = dumps_json(prompt.body)
            total_s = self._sla.timeout_s(prompt.prompt_tokens, prompt.max_output_tokens)
            out, attempts, started_at = await self._exchange(
                transport, self._node_slot(node.node_id), url, data, total_s
            )
            return self._relay_of(
                prompt,
                out.code,
                started_at,
                self._clock(),
                attempts,
                status=out.status,
                error=out.error,
                response=out.response,
                latency_s=out.latency_s,
                ttft_s=out.ttft_s,
            )
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not lose the relay
            log.exception(
                "relay_internal_error prompt_id=%s node_id=%s", prompt.prompt_id, prompt.node_id
            )
            return self._relay_of(
                prompt,
                ErrorCode.RELAY,
                started_at,
                self._clock(),
                1,
                error=f"internal error: {type(exc).__name__}: {exc}",
            )

    async def _exchange(
        self,
        transport: NodeTransport,
        node_slot: asyncio.Semaphore,
        url: URL,
        data: bytes,
        total_s: float,
        held: bool = False,
    ) -> tuple[_Attempt, int, float]:
        """POST with the retries that are correct, each attempt under the node's and a
        global slot (``held``: the caller already holds them for the first attempt; they
        are released here either way). The final attempt, how many, when the first began."""
        max_attempts = self.settings.max_retries + 1
        started_at = self._clock()
        attempts = 0
        try:
            timeout = self._timeout(total_s)
            while True:
                if not held:
                    await self._acquire_slots(node_slot)
                    held = True
                try:
                    attempts += 1
                    if attempts == 1:
                        started_at = self._clock()
                    self._attempts += 1
                    self._in_flight += 1
                    try:
                        got = await self._attempt(transport, url, data, timeout)
                    finally:
                        self._in_flight -= 1
                finally:
                    held = False
                    self._release_slots(node_slot)
                if node_slot.locked():
                    # A request waited for this slot and has it now: let it go out before
                    # this answer's parse (a few ms of CPU for echoed prompt logprobs) holds
                    # the event loop. aiohttp writes a body from a task of its own, one
                    # loop turn after the request starts: two turns. A body sent late waits
                    # a whole engine step at a node that batches.
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                out = got if isinstance(got, _Attempt) else self._parsed(transport, got)
                if not out.retryable or attempts >= max_attempts:
                    return out, attempts, started_at
                self._retries += 1
                await asyncio.sleep(self._backoff_s(attempts, out.retry_after_s))
        finally:
            if held:  # failed before the first attempt, with the caller's slots
                self._release_slots(node_slot)

    def _timeout(self, total_s: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(total_s)
        if timeout is None:
            if len(self._timeouts) > 4096:
                self._timeouts.clear()
            timeout = self._timeouts[total_s] = aiohttp.ClientTimeout(
                total=total_s, sock_connect=self.settings.connect_timeout_s
            )
        return timeout

    # -- coalescing ---------------------------------------------------------------------

    async def _coalescing_worker(
        self, transport: NodeTransport, queue: deque[_Queued], node: Node, call: _Call
    ) -> None:
        """Serve the node's queue (any call's prompts) until its own call has every relay.

        A call's workers stop once their call is done, so no call waits on others' work
        beyond the body it is sending; every queued prompt's own call still has workers.
        """
        node_slot = self._node_slot(node.node_id)
        while queue and call.remaining > 0:
            await self._acquire_slots(node_slot)
            if not queue or call.remaining == 0:  # served by other workers meanwhile
                self._release_slots(node_slot)
                return
            # Taken only now, holding the slots: everything that queued meanwhile can join.
            batch = self._take_batch(queue)
            # The batch may hold other calls' prompts: whatever happens, each gets a relay,
            # or its caller would wait forever.
            try:
                relays = await self._relay_coalesced(transport, batch, node, node_slot)
            except asyncio.CancelledError:
                for entry in batch:
                    entry.resolve(self._lost(entry.prompt, "relay cancelled"))
                raise
            except Exception as exc:  # noqa: BLE001 - a bug of ours must not lose relays
                log.exception("relay_internal_error node_id=%s", node.node_id)
                why = f"{type(exc).__name__}: {exc}"
                relays = [self._lost(entry.prompt, why) for entry in batch]
            for entry, relay in zip(batch, relays, strict=True):
                entry.resolve(relay)

    async def _acquire_slots(self, node_slot: asyncio.Semaphore) -> None:
        """The node's slot, then a global one (the order ``_relay_one`` takes them in)."""
        await node_slot.acquire()
        try:
            await self._global.acquire()
        except BaseException:
            node_slot.release()
            raise

    def _release_slots(self, node_slot: asyncio.Semaphore) -> None:
        self._global.release()
        node_slot.release()

    def _take_batch(self, queue: deque[_Queued]) -> list[_Queued]:
        """The oldest prompt and the compatible ones behind it, up to the item limit."""
        first = queue.popleft()
        batch = [first]
        if first.key is None:  # a key exists only for a prompt with items
            return batch
        limit = self.settings.coalesce_prompts
        n = len(first.items or ())
        skipped: list[_Queued] = []
        scanned = 0
        while queue and n < limit and scanned < 4 * limit:
            entry = queue.popleft()
            scanned += 1
            if entry.key == first.key and n + len(entry.items or ()) <= limit:
                batch.append(entry)
                n += len(entry.items or ())
            else:
                skipped.append(entry)
        queue.extendleft(reversed(skipped))  # they keep their place at the front
        return batch

    async def _relay_coalesced(
        self,
        transport: NodeTransport,
        batch: list[_Queued],
        node: Node,
        node_slot: asyncio.Semaphore,
    ) -> list[Relay]:
        """One body for the batch; called holding the node and global slots (released here)."""
        try:
            first = batch[0].prompt
            if len(batch) == 1:
                data = dumps_json(first.body)
            else:
                items = [item for entry in batch for item in entry.items or ()]
                data = dumps_json(wire.with_prompts(first.body, items))
                self._bodies_coalesced += 1
                self._prompts_coalesced += len(batch)
            # The engine runs a body's prompts side by side: its prompt tokens add up, its
            # output is as long as the longest answer.
            total_s = self._sla.timeout_s(
                sum(e.prompt.prompt_tokens for e in batch),
                max(e.prompt.max_output_tokens for e in batch),
            )
            url = self._url(node, first.path)
        except BaseException:
            self._release_slots(node_slot)
            raise
        out, attempts, started_at = await self._exchange(
            transport, node_slot, url, data, total_s, held=True
        )
        finished_at = self._clock()
        code, error = out.code, out.error
        responses: list[dict[str, Any] | None] = [out.response] * len(batch)
        if len(batch) > 1 and code == ErrorCode.OK and out.response is not None:
            sizes = [len(e.items or ()) for e in batch]
            try:
                responses = list(wire.split_choices(out.response, sizes))
            except wire.MalformedAnswer as exc:
                error = f"coalesced body of {sum(sizes)} prompts: {exc}"
                code, responses = ErrorCode.NODE, [None] * len(batch)
        return [
            self._relay_of(entry.prompt, code, started_at, finished_at, attempts,
                           status=out.status, error=error, response=response,
                           latency_s=out.latency_s, ttft_s=out.ttft_s)
            for entry, response in zip(batch, responses, strict=True)
        ]

    def _backoff_s(self, attempt: int, retry_after_s: float | None) -> float:
        base = min(self.settings.retry_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        delay = base * (0.5 + 0.5 * self._rng.random())
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, MAX_BACKOFF_S))
        return delay

    async def _attempt(
        self,
        transport: NodeTransport,
        url: URL,
        data: bytes,
        timeout: aiohttp.ClientTimeout,
    ) -> _Attempt | NodeBytes:
        """One attempt: its failure, or the answer's bytes (parsed by :meth:`_parsed`)."""
        try:
            return await transport.receive("POST", url, data, timeout, timeout_source="SLA")
        except NodeUnavailable as exc:
            return _Attempt(
                ErrorCode.NODE,
                exc.status,
                str(exc),
                retryable=exc.retryable,
                retry_after_s=exc.retry_after_s,
                ttft_s=exc.ttft_s,
                latency_s=exc.latency_s,
            )
        except wire.MalformedAnswer as exc:
            return _malformed(exc)

    @staticmethod
    def _parsed(transport: NodeTransport, received: NodeBytes) -> _Attempt:
        try:
            answer = transport.parse_answer(received)
        except wire.MalformedAnswer as exc:  # never retried: the node answered
            return _malformed(exc)
        return _Attempt(
            ErrorCode.OK,
            answer.status,
            response=answer.body,
            ttft_s=answer.ttft_s,
            latency_s=answer.latency_s,
        )
