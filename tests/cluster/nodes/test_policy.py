"""The endpoint policy: refused address classes, allowlists, pinned resolution, rebinding."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node, Prompt
from cluster.core.settings import EndpointAllowlist, EvaluationSettings, RequesterSettings
from cluster.nodes.policy import (
    AddressClass,
    EndpointGuard,
    EndpointPolicy,
    EndpointRefusedError,
    classify,
)
from cluster.nodes.requester import Requester
from cluster.testing.testnode import NodeBehaviour, TestNode

# One literal per refused class and IPv6 form; the name "node.test" resolves to each.
REFUSED = [
    ("0.0.0.0", AddressClass.UNSPECIFIED),
    ("::", AddressClass.UNSPECIFIED),
    ("127.0.0.1", AddressClass.LOOPBACK),
    ("127.5.6.7", AddressClass.LOOPBACK),
    ("::1", AddressClass.LOOPBACK),
    ("10.1.2.3", AddressClass.PRIVATE),
    ("172.16.5.4", AddressClass.PRIVATE),
    ("192.168.1.1", AddressClass.PRIVATE),
    ("fd12:3456::1", AddressClass.PRIVATE),
    ("169.254.1.1", AddressClass.LINK_LOCAL),
    ("fe80::1", AddressClass.LINK_LOCAL),
    ("100.64.0.1", AddressClass.CGNAT),
    ("100.127.255.254", AddressClass.CGNAT),
    ("224.0.0.1", AddressClass.MULTICAST),
    ("ff02::1", AddressClass.MULTICAST),
    ("169.254.169.254", AddressClass.METADATA),
    ("fd00:ec2::254", AddressClass.METADATA),
    ("100.100.100.200", AddressClass.METADATA),
    ("168.63.129.16", AddressClass.METADATA),
    ("240.0.0.1", AddressClass.RESERVED),
    ("255.255.255.255", AddressClass.RESERVED),
    ("2001:db8::1", AddressClass.RESERVED),
    # IPv6 forms of IPv4 addresses are judged by the IPv4 address
    ("::ffff:127.0.0.1", AddressClass.LOOPBACK),
    ("::ffff:10.0.0.1", AddressClass.PRIVATE),
    ("::ffff:169.254.169.254", AddressClass.METADATA),
    ("::127.0.0.1", AddressClass.LOOPBACK),
    ("64:ff9b::a00:1", AddressClass.PRIVATE),  # NAT64 of 10.0.0.1
    ("2002:c0a8:101::1", AddressClass.PRIVATE),  # 6to4 of 192.168.1.1
]
PUBLIC = ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


def make_node(node_id: str, url: str) -> Node:
    return Node(node_id=node_id, url=url, model="smollm2")  # type: ignore[arg-type]


def make_prompt(i: int) -> Prompt:
    key = f"n1|task|{i}|0"
    return Prompt(prompt_id=f"{key}|0", sample_key=key, node_id="n1", task="task", doc_id=i,
                  request_index=0, n_requests=1, path="/v1/completions",
                  body={"prompt": f"prompt {i}", "max_tokens": 4}, prompt_tokens=8,
                  max_output_tokens=4, created_at=0.0)


def url_of(address: str, host: str | None = None) -> str:
    if host is not None:
        return f"http://{host}:8000"
    return f"http://[{address}]:8000" if ":" in address else f"http://{address}:8000"


def guard_of(*allowlists: EndpointAllowlist | None, answers: list[list[str]] | None = None,
             cache_s: float = 60.0) -> tuple[EndpointGuard, list[str]]:
    """A guard whose lookups answer ``answers`` in turn (the last one repeats)."""
    asked: list[str] = []

    async def lookup(host: str, port: int) -> list[str]:
        asked.append(host)
        queue = answers or [[]]
        return queue[min(len(asked), len(queue)) - 1]

    return EndpointGuard.of(*allowlists, lookup=lookup, cache_s=cache_s), asked


@pytest.mark.parametrize(("address", "cls"), REFUSED, ids=[a for a, _ in REFUSED])
async def test_each_refused_class_is_refused_as_a_literal_and_as_a_name(
    address: str, cls: AddressClass
) -> None:
    assert classify(ipaddress.ip_address(address)) is cls
    guard, _ = guard_of(answers=[[address]])
    with pytest.raises(EndpointRefusedError, match=cls.value) as literal:
        await guard.check_url(url_of(address))
    assert literal.value.refusal is not None and literal.value.refusal.cls is cls
    with pytest.raises(EndpointRefusedError, match=f"node.test resolves to .*{cls.value}"):
        await guard.check_url(url_of(address, host="node.test"))
    with pytest.raises(EndpointRefusedError):  # what the transport checks before a request
        guard.check_literal(address)


@pytest.mark.parametrize("address", PUBLIC)
async def test_public_addresses_and_names_resolving_to_them_pass(address: str) -> None:
    guard, _ = guard_of(answers=[[address]])
    assert classify(ipaddress.ip_address(address)) is None
    assert await guard.check_url(url_of(address)) == [ipaddress.ip_address(address)]
    assert await guard.check_url(url_of(address, host="node.test")) == [
        ipaddress.ip_address(address)]


async def test_a_name_is_refused_when_any_of_its_addresses_is() -> None:
    guard, _ = guard_of(answers=[["93.184.215.14", "10.0.0.7"]])
    with pytest.raises(EndpointRefusedError, match="10.0.0.7, a private address"):
        await guard.check_url("https://mixed.test/v1")


async def test_a_name_that_does_not_resolve_cannot_be_checked() -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    guard = EndpointGuard.of(None, lookup=nxdomain)
    with pytest.raises(EndpointRefusedError, match="does not resolve"):
        await guard.check_url("http://nowhere.test")


async def test_a_non_canonical_ipv4_literal_is_resolved_and_refused() -> None:
    # 2130706433 is 127.0.0.1 as one number: the system resolver maps it, the guard checks
    guard = EndpointGuard.of(None)
    with pytest.raises(EndpointRefusedError, match="loopback"):
        await guard.check_url("http://2130706433:8000/")


async def test_allowlisted_networks_and_hosts_are_accepted() -> None:
    allow = EndpointAllowlist(networks=["10.0.0.0/8", "::1/128"], hosts=["VLLM.internal.", "127.0.0.9"])
    guard, _ = guard_of(allow, answers=[["172.20.0.5"]])
    assert await guard.check_url("http://10.9.8.7:8000") == [ipaddress.ip_address("10.9.8.7")]
    assert await guard.check_url("http://[::1]:8000")
    assert await guard.check_url("http://127.0.0.9:8000")  # an address entry: that address
    with pytest.raises(EndpointRefusedError, match="loopback"):
        await guard.check_url("http://127.0.0.8:8000")
    # a host entry allows the name whatever it resolves to, any case, trailing dot or not
    assert await guard.check_url("http://vllm.INTERNAL:8000") == [ipaddress.ip_address("172.20.0.5")]
    with pytest.raises(EndpointRefusedError, match="other.internal resolves to 172.20.0.5"):
        await guard.check_url("http://other.internal:8000")


async def test_cloud_metadata_opens_only_to_its_own_address() -> None:
    wide = EndpointPolicy.from_allowlist(EndpointAllowlist(
        networks=["169.254.0.0/16", "0.0.0.0/0"], hosts=["metadata.google.internal"]))
    metadata = ipaddress.ip_address("169.254.169.254")
    assert wide.refusal(ipaddress.ip_address("169.254.10.10")) is None
    assert wide.refusal(metadata) is not None
    assert wide.refusal(metadata, host="metadata.google.internal") is not None
    exact = EndpointPolicy.from_allowlist(EndpointAllowlist(networks=["169.254.169.254/32"]))
    assert exact.refusal(metadata) is None


def test_allowlists_are_validated_and_tenants_must_exist() -> None:
    with pytest.raises(ValidationError, match="host bits set"):
        EndpointAllowlist(networks=["10.0.0.1/8"])
    with pytest.raises(ValidationError, match="without scheme"):
        EndpointAllowlist(hosts=["http://x.test/"])
    with pytest.raises(ValidationError, match="no tenants"):
        EvaluationSettings(tenants={"a": "x" * 16},
                           endpoint_allowlists={"b": EndpointAllowlist.loopback()})
    ok = EvaluationSettings(tenants={"a": "x" * 16}, endpoint_allowlists={
        "*": EndpointAllowlist.loopback(), "a": EndpointAllowlist(hosts=["svc"])})
    assert ok.endpoint_allowlists["a"].hosts == ["svc"]


# -- the Requester: connections go only where the policy allows ---------------------------


@pytest.fixture
async def local_node() -> AsyncIterator[TestNode]:
    node = TestNode(NodeBehaviour())
    await node.start()
    yield node
    await node.stop()


async def test_the_requester_refuses_loopback_unless_allowlisted(local_node: TestNode) -> None:
    node = make_node("n1", local_node.base_url or "")
    denied = Requester(RequesterSettings(max_retries=2))
    allowed = Requester(RequesterSettings(endpoint_allowlist=EndpointAllowlist.loopback()))
    try:
        [refused] = await denied.relay([make_prompt(0)], {"n1": node})
        assert refused.error_code == ErrorCode.NODE and refused.attempts == 1  # not retried
        assert refused.error is not None and "127.0.0.1, a loopback address" in refused.error
        assert local_node.stats.requests == 0
        [ok] = await allowed.relay([make_prompt(1)], {"n1": node})
        assert ok.error_code == ErrorCode.OK and local_node.stats.requests == 1
        # a guard given per call (a tenant's) replaces the Requester's own
        [again] = await allowed.relay([make_prompt(2)], {"n1": node}, guard=EndpointGuard.of(None))
        assert again.error_code == ErrorCode.NODE and local_node.stats.requests == 1
    finally:
        await denied.close()
        await allowed.close()


async def test_a_rebinding_name_never_reaches_its_private_answer() -> None:
    """rebind.test answers an allowed address first, then a refused one. (A test cannot
    reach a public address: 127.0.0.2, allowlisted, stands in for it; 127.0.0.1 on the same
    port is the private service behind it.)"""
    public = TestNode(NodeBehaviour(latency_s=0.3), host="127.0.0.2")
    await public.start()
    private = TestNode(NodeBehaviour(), host="127.0.0.1", port=public.port)
    await private.start()
    guard, asked = guard_of(EndpointAllowlist(networks=["127.0.0.2/32"]),
                            answers=[["127.0.0.2"], ["127.0.0.1"]], cache_s=0.0)
    requester = Requester(RequesterSettings(per_node_concurrency=2, max_retries=2), guard=guard)
    node = make_node("n1", f"http://rebind.test:{public.port}")
    try:
        # two requests at once: two connections, each resolving the name anew
        relays = await requester.relay([make_prompt(0), make_prompt(1)], {"n1": node})
        codes = sorted(r.error_code for r in relays)
        assert codes == [ErrorCode.OK, ErrorCode.NODE], relays
        [refused] = [r for r in relays if r.error_code == ErrorCode.NODE]
        assert refused.error is not None
        assert "rebind.test resolves to 127.0.0.1, a loopback address" in refused.error
        assert refused.attempts == 1
        assert asked == ["rebind.test", "rebind.test"]
        assert public.stats.requests == 1
        assert private.stats.requests == 0
    finally:
        await requester.close()
        await public.stop()
        await private.stop()


async def test_bodies_stay_out_of_errors_when_asked(local_node: TestNode) -> None:
    local_node.behaviour = NodeBehaviour(error_rate=1.0)
    settings = RequesterSettings(endpoint_allowlist=EndpointAllowlist.loopback())
    quoting, quiet = Requester(settings), Requester(settings, quote_bodies=False)
    node = {"n1": make_node("n1", local_node.base_url or "")}
    try:
        [loud] = await quoting.relay([make_prompt(0)], node)
        [hushed] = await quiet.relay([make_prompt(1)], node)
    finally:
        await quoting.close()
        await quiet.close()
    assert loud.error is not None and loud.error.startswith("HTTP 500: ")
    assert hushed.status == 500 and hushed.error is not None
    assert hushed.error.startswith("HTTP 500 (") and "body not quoted" in hushed.error
    assert loud.error.removeprefix("HTTP 500: ")[:20] not in hushed.error
