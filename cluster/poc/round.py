"""Running a PoC round against nodes over HTTP and judging what they return.

For each node: ``/pow/init/generate`` with the round's seed and the node's key, wait
until it generates, let it work ``seconds``, ``/pow/stop``, page through
``/pow/batches``, then validate a random sample. Every call is one exchange of the node
transport (``cluster/nodes/transport.py``), signed when the driver has a signer, and obeys
the endpoint policy (``cluster/nodes/policy.py``; :func:`run_poc_round`: the Requester's
``requester.endpoint_allowlist``). A node that fails on the way, or whose URL the policy
refuses (it is sent nothing), gets a :class:`NodeRoundResult` with its error, never a silent
gap.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.core.errors import NodeError
from cluster.core.settings import Settings
from cluster.nodes.policy import EndpointGuard
from cluster.nodes.transport import NodeEndpoint, NodeTransport
from cluster.poc.config import PocRoundParams, ValidationConfig
from cluster.poc.validator import ClaimedProof, PocValidator, Verdict

if TYPE_CHECKING:
    from cluster.auth.peers import RequestSigner

log = logging.getLogger(__name__)

API = "/api/v1"


class PocNodeTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    node_id: str = Field(min_length=1)
    url: str = Field(min_length=1, description="base URL; the routes are under {url}/api/v1")
    public_key: str = Field(min_length=1)


class NodeRoundResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: str
    verdict: Verdict | None = None
    error: str | None = None
    nonces_computed: int = 0
    generate_s: float = 0.0


class PocRoundDriver:
    def __init__(
        self,
        params: PocRoundParams,
        validator: PocValidator,
        rng: random.Random,
        load_timeout_s: float = 180.0,
        http_timeout_s: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        signer: RequestSigner | None = None,
        guard: EndpointGuard | None = None,
    ) -> None:
        self._params = params
        self._validator = validator
        self._rng = rng
        self._load_timeout_s = load_timeout_s
        self._http_timeout_s = http_timeout_s
        self._sleep = sleep
        self._clock = clock
        # nodes with peer auth on take only signed control requests
        self._signer = signer
        # the endpoint policy of every connection (default: public addresses only)
        self._guard = EndpointGuard.of() if guard is None else guard

    def init_body(self, target: PocNodeTarget, callback_url: str | None = None) -> dict[str, Any]:
        from cluster.poc.protocol import PowInitRequest

        p = self._params
        return PowInitRequest(
            block_hash=p.seed, public_key=target.public_key, r_target=p.r_target,
            batch_size=p.batch_size, params=p.model, url=callback_url,
        ).model_dump(mode="json")

    async def run(self, targets: list[PocNodeTarget], seconds: float) -> list[NodeRoundResult]:
        """All nodes generate at the same time; each is judged on its own claim."""
        seeds = [self._rng.getrandbits(63) for _ in targets]
        middlewares = (self._signer.aiohttp_middleware,) if self._signer is not None else ()
        transport = NodeTransport.open(middlewares=middlewares, guard=self._guard)
        try:
            results = await asyncio.gather(*(
                self._one(transport, t, seconds, s) for t, s in zip(targets, seeds, strict=True)))
        finally:
            await transport.close()
        return list(results)

    async def _one(self, transport: NodeTransport, target: PocNodeTarget, seconds: float,
                   sample_seed: int) -> NodeRoundResult:
        try:
            claim, computed, took = await self.collect(transport, target, seconds)
        except (NodeError, ValidationError) as exc:
            log.warning("poc.round.node_failed node=%s error=%s", target.node_id, exc)
            return NodeRoundResult(node_id=target.node_id, error=f"{type(exc).__name__}: {exc}")
        verdict = await asyncio.to_thread(self._validator.validate, claim, sample_seed)
        return NodeRoundResult(node_id=target.node_id, verdict=verdict,
                               nonces_computed=computed, generate_s=took)

    async def collect(self, transport: NodeTransport, target: PocNodeTarget,
                      seconds: float) -> tuple[ClaimedProof, int, float]:
        """(the node's claim, nonces it reports computed, seconds it generated)."""
        from cluster.poc.protocol import BatchesResponse, PowStatusResponse

        node = NodeEndpoint(target.url.rstrip("/") + API, transport, self._http_timeout_s)
        await node.post_json("/pow/init/generate", self.init_body(target))
        deadline = self._clock() + self._load_timeout_s
        while True:
            status = PowStatusResponse.model_validate(await node.get_json("/pow/status"))
            if status.status == "GENERATING":
                break
            if status.status == "STOPPED" or self._clock() > deadline:
                raise NodeError(f"node {target.node_id} did not start generating "
                                f"(status {status.status}, error {status.last_error})")
            await self._sleep(0.2)
        started = self._clock()
        await self._sleep(seconds)
        await node.request_json("POST", "/pow/stop")
        took = self._clock() - started
        status = PowStatusResponse.model_validate(await node.get_json("/pow/status"))
        nonces: list[int] = []
        dist: list[float] = []
        offset = 0
        while True:
            page = BatchesResponse.model_validate(
                await node.get_json(f"/pow/batches?offset={offset}&limit=10000"))
            for batch in page.batches:
                if batch.public_key != target.public_key or batch.block_hash != self._params.seed:
                    raise NodeError(f"node {target.node_id} returned a batch for another "
                                    f"key or seed ({batch.public_key}, {batch.block_hash})")
                nonces.extend(batch.nonces)
                dist.extend(batch.dist)
            if page.next_offset >= page.total or not page.batches:
                break
            offset = page.next_offset
        claim = ClaimedProof(node_id=target.node_id, public_key=target.public_key,
                             nonces=nonces, distances=dist)
        return claim, status.nonces_computed, took



async def run_poc_round(
    settings: Settings,
    params: PocRoundParams,
    validation: ValidationConfig,
    targets: list[PocNodeTarget],
    seconds: float,
    *,
    sample_seed: int | None = None,
    record: bool = True,
    guard: EndpointGuard | None = None,
) -> list[NodeRoundResult]:
    """One round against ``targets`` (signed with ``settings.auth``'s key when set, the key
    nodes with peer auth expect); verdicts recorded in MongoDB when ``record`` and a store
    is configured. ``sample_seed`` fixes which nonces are validated (default: fresh).
    Connections obey ``guard`` (default: the endpoint policy with
    ``requester.endpoint_allowlist``); a refused node's result says why."""
    from cluster.auth.peers import RequestSigner
    from cluster.poc.compute import PocComputer
    from cluster.poc.verdicts import record_verdicts
    from cluster.storage.connections import open_mongo

    validator = PocValidator(PocComputer(params, "validator"), validation)
    seed = random.SystemRandom().getrandbits(63) if sample_seed is None else sample_seed
    if guard is None:
        guard = EndpointGuard.of(settings.requester.endpoint_allowlist)
    driver = PocRoundDriver(params, validator, random.Random(seed),
                            signer=RequestSigner.from_settings(settings.auth), guard=guard)
    results = await driver.run(targets, seconds)
    verdicts = [r.verdict for r in results if r.verdict is not None]
    if verdicts and record and settings.stores.mongo_url:
        async with open_mongo(settings) as mongo:
            await record_verdicts(mongo, verdicts)
    return results
