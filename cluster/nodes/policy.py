"""Which endpoints testbench may reach: the endpoint policy, and the guard that pins it.

testbench sends requests wherever a tenant (the evaluation service) or an operator (node
registration) points it. Without a policy that is a way into the networks testbench runs
in: loopback services, a cluster's private addresses, a cloud's metadata endpoint. The rule
(:meth:`EndpointPolicy.refusal`):

- An address is **refused** when it is in one of the classes of :class:`AddressClass`:
  unspecified (``0.0.0.0/8``, ``::``), loopback (``127.0.0.0/8``, ``::1``), private
  (``10/8``, ``172.16/12``, ``192.168/16``, ``fc00::/7``), link-local (``169.254/16``,
  ``fe80::/10``), carrier-grade NAT (``100.64.0.0/10``), multicast (``224.0.0.0/4``,
  ``ff00::/8``), reserved (``240.0.0.0/4``, ``192.0.0.0/24``, benchmarking and
  documentation ranges, IPv6 outside global unicast ``2000::/3``) and cloud metadata
  (:data:`METADATA_ADDRESSES`). Every other address is public and allowed.
- IPv6 forms that carry an IPv4 address are judged by that address: IPv4-mapped
  (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), NAT64 (``64:ff9b::/96``), 6to4
  (``2002::/16``) and Teredo (``2001::/32``, its client address).
- The operator's **allowlist** (:class:`~cluster.core.settings.EndpointAllowlist`) lets
  refused addresses through: an address inside one of its ``networks``, or any address of
  a name in its ``hosts`` (a host entry that is an address is a one-address network).
  Cloud metadata addresses pass only by a network entry of that very address (``/32`` or
  ``/128``): a wide network such as ``169.254.0.0/16`` or a host name never opens them.
- A name is refused when **any** of its addresses is refused.

:class:`EndpointGuard` applies a policy where connections are made. Names are resolved by
the guard (its ``lookup``, injectable), every address is checked, and the connection goes
to exactly the checked addresses: :meth:`EndpointGuard.aiohttp_resolver` is the resolver of
the transport's connector (``cluster/nodes/transport.py``), so aiohttp never resolves a name
a second time, and a name that answers a public address first and a private one later
(DNS rebinding) is refused at the later answer, before any connection to it. Answers are
kept ``cache_s`` seconds. Address literals in URLs are checked by
:meth:`EndpointGuard.check_literal` before each request. :meth:`EndpointGuard.check_url`
checks an endpoint up front (a submitted evaluation, a node registration) with the same
rule. Redirects are never followed (the transport's own rule), so an allowed endpoint
cannot send testbench on to a refused one.

Who applies which allowlist: ``requester.endpoint_allowlist`` is the rule of every
connection to a node: node registration (:func:`check_node_url`: ``testbench nodes add``,
``make run``'s demo), the loop's Requester, the honesty verification rounds
(``cluster/honesty/verification.py``: the Auditor's rounds, ``testbench verify``), the
streaming-job audits and their registration (``cluster/honesty/job_audits.py``: the
Auditor's, ``testbench receipts``), the PoC rounds (``cluster/poc/round.py``, ``testbench
poc round``) and ``testbench train`` (``cluster/train/client.py``). A refused node is sent
nothing: its verdicts or result say why, and the others go on. The trusted references
(``cluster/honesty/reference.py``) are the operator's own servers: they get a session of
their own, outside the policy. The evaluation service uses each tenant's
``evaluations.endpoint_allowlists`` (plus ``'*'``) at submission and for the run's
connections (``cluster/evaluations/endpoints.py``). An MLNode sends its training peers'
outer-sync messages (``cluster/train/exchange.py``) under its own
``training.peer_allowlist`` (``serve_apps/poc/config.py``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from cluster.core.errors import NodeError, RegistrationError
from cluster.core.settings import EndpointAllowlist

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Lookup = Callable[[str, int], Awaitable[list[str]]]

DNS_CACHE_S = 60.0
LOOKUP_TIMEOUT_S = 10.0


class AddressClass(StrEnum):
    """Why an address is refused by default."""

    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link-local"
    CGNAT = "carrier-grade NAT"
    MULTICAST = "multicast"
    RESERVED = "reserved"
    METADATA = "cloud metadata"


# Instance metadata services: AWS/GCP/Azure/OpenStack (169.254.169.254), AWS ECS task
# metadata (169.254.170.2), AWS IMDS over IPv6 (fd00:ec2::254), Alibaba (100.100.100.200),
# Azure's wire server (168.63.129.16: a public address), Oracle (192.0.0.192).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200",
    "168.63.129.16", "192.0.0.192",
))


def _nets(cls: AddressClass, *cidrs: str) -> list[tuple[IPNetwork, AddressClass]]:
    return [(ipaddress.ip_network(c), cls) for c in cidrs]


_V4_CLASSES = [
    *_nets(AddressClass.UNSPECIFIED, "0.0.0.0/8"),
    *_nets(AddressClass.LOOPBACK, "127.0.0.0/8"),
    *_nets(AddressClass.PRIVATE, "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"),
    *_nets(AddressClass.LINK_LOCAL, "169.254.0.0/16"),
    *_nets(AddressClass.CGNAT, "100.64.0.0/10"),
    *_nets(AddressClass.MULTICAST, "224.0.0.0/4"),
    *_nets(AddressClass.RESERVED, "240.0.0.0/4", "192.0.0.0/24", "198.18.0.0/15",
           "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"),
]
_V6_CLASSES = [
    *_nets(AddressClass.UNSPECIFIED, "::/128"),
    *_nets(AddressClass.LOOPBACK, "::1/128"),
    *_nets(AddressClass.PRIVATE, "fc00::/7"),
    *_nets(AddressClass.LINK_LOCAL, "fe80::/10"),
    *_nets(AddressClass.MULTICAST, "ff00::/8"),
    *_nets(AddressClass.RESERVED, "2001:db8::/32", "2001:2::/48", "3fff::/20"),
]
_V6_GLOBAL = ipaddress.ip_network("2000::/3")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, NAT64, 6to4,
    Teredo), or None."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.teredo is not None:
        return address.teredo[1]
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _V4_COMPATIBLE and int(address) > 1:  # ::a.b.c.d (not :: or ::1)
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def classify(address: IPAddress) -> AddressClass | None:
    """The refused class of ``address``, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            address = ipaddress.IPv6Address(int(address))  # the zone is no address
        inner = embedded_ipv4(address)
        if inner is not None:
            return classify(inner)
    if address in METADATA_ADDRESSES:
        return AddressClass.METADATA
    for net, cls in (_V4_CLASSES if address.version == 4 else _V6_CLASSES):
        if address in net:
            return cls
    if address.version == 6 and address not in _V6_GLOBAL:
        return AddressClass.RESERVED
    return None


def parse_address(host: str) -> IPAddress | None:
    """``host`` as an address (brackets of an IPv6 URL host allowed), or None for a name."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def normalize_host(host: str) -> str:
    """A host name as the allowlist compares it: lower case, no trailing dot."""
    return host.strip().lower().rstrip(".")


@dataclass(frozen=True)
class Refusal:
    """One refused address and why; ``host`` is the name that resolved to it, if any."""

    address: IPAddress
    cls: AddressClass
    host: str | None = None

    @property
    def message(self) -> str:
        where = f"{self.host} resolves to {self.address}" if self.host else str(self.address)
        inner = embedded_ipv4(self.address) if self.address.version == 6 else None
        if inner is not None:
            where += f" (IPv4 {inner})"
        return (f"{where}, a {self.cls.value} address, which testbench does not reach "
                "unless the operator allowlists it")


class EndpointRefusedError(NodeError):
    """The endpoint policy refuses an endpoint (or a name does not resolve to check it)."""

    def __init__(self, message: str, refusal: Refusal | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal


@dataclass(frozen=True)
class EndpointPolicy:
    """The refused classes (module docstring) less an operator's allowlist."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_allowlist(cls, *allowlists: EndpointAllowlist | None) -> EndpointPolicy:
        """One policy allowing what any of ``allowlists`` allows."""
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for allowlist in allowlists:
            if allowlist is None:
                continue
            networks += [ipaddress.ip_network(n) for n in allowlist.networks]
            for host in allowlist.hosts:
                address = parse_address(host)
                if address is not None:
                    networks.append(ipaddress.ip_network(address))
                else:
                    hosts.add(normalize_host(host))
        return cls(tuple(dict.fromkeys(networks)), frozenset(hosts))

    def refusal(self, address: IPAddress, host: str | None = None) -> Refusal | None:
        """None when ``address`` (reached by the name ``host``, if any) may be reached."""
        cls = classify(address)
        if cls is None:
            return None
        if cls is AddressClass.METADATA:
            exact = ipaddress.ip_network(address)
            if exact in self.networks:
                return None
            return Refusal(address, cls, host)
        if host is not None and normalize_host(host) in self.hosts:
            return None
        if any(address in net for net in self.networks):
            return None
        return Refusal(address, cls, host)

    def check(self, addresses: Iterable[IPAddress], host: str | None = None) -> None:
        """Raise :class:`EndpointRefusedError` when any address is refused."""
        for address in addresses:
            refused = self.refusal(address, host)
            if refused is not None:
                raise EndpointRefusedError(f"endpoint refused: {refused.message}", refused)


async def system_lookup(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for ``host`` (getaddrinfo, any family)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class EndpointGuard:
    """An :class:`EndpointPolicy` applied where connections are made (module docstring).

    ``lookup`` resolves a name to address strings (the system resolver by default; tests
    inject one); answers are checked on every lookup and kept ``cache_s`` seconds.
    """

    def __init__(
        self,
        policy: EndpointPolicy,
        *,
        lookup: Lookup = system_lookup,
        cache_s: float = DNS_CACHE_S,
        lookup_timeout_s: float = LOOKUP_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._lookup = lookup
        self._cache_s = cache_s
        self._lookup_timeout_s = lookup_timeout_s
        self._clock = clock
        self._answers: dict[str, tuple[float, list[IPAddress]]] = {}
        self._literals: dict[str, Refusal | None] = {}

    @classmethod
    def of(cls, *allowlists: EndpointAllowlist | None, **kwargs: Any) -> EndpointGuard:
        return cls(EndpointPolicy.from_allowlist(*allowlists), **kwargs)

    def check_literal(self, host: str | None) -> None:
        """Raise when ``host`` is an address literal the policy refuses (names pass: they
        are checked when the connection resolves them)."""
        if host is None:
            return
        try:
            refused = self._literals[host]
        except KeyError:
            address = parse_address(host)
            refused = None if address is None else self.policy.refusal(address)
            if len(self._literals) > 4096:
                self._literals.clear()
            self._literals[host] = refused
        if refused is not None:
            raise EndpointRefusedError(f"endpoint refused: {refused.message}", refused)

    async def addresses(self, host: str, port: int = 0) -> list[IPAddress]:
        """The checked addresses of ``host`` (a name or a literal). Raises
        :class:`EndpointRefusedError` when one is refused, ``OSError`` when the name does
        not resolve."""
        literal = parse_address(host)
        if literal is not None:
            self.policy.check([literal])
            return [literal]
        key = normalize_host(host)
        now = self._clock()
        cached = self._answers.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with asyncio.timeout(self._lookup_timeout_s):
            answer = await self._lookup(host, port)
        found: list[IPAddress] = []
        for text in answer:
            address = parse_address(text)
            if address is None:
                raise OSError(f"{host}: the resolver answered {text!r}, not an address")
            found.append(address)
        if not found:
            raise OSError(f"{host} does not resolve to any address")
        self.policy.check(found, host)
        if self._cache_s > 0:
            if len(self._answers) > 4096:
                self._answers.clear()
            self._answers[key] = (now + self._cache_s, found)
        return found

    async def check_url(self, url: str) -> list[IPAddress]:
        """Check an endpoint URL up front: its address, or every address its name resolves
        to. Raises :class:`EndpointRefusedError` (also when the name does not resolve)."""
        parsed = URL(url)
        host = parsed.raw_host
        if not host:
            raise EndpointRefusedError(f"endpoint {url!r} has no host")
        try:
            return await self.addresses(host, parsed.port or 0)
        except EndpointRefusedError:
            raise
        except (OSError, TimeoutError) as exc:
            raise EndpointRefusedError(
                f"endpoint refused: {host} does not resolve ({exc or type(exc).__name__}), "
                "so it cannot be checked") from exc

    def aiohttp_resolver(self) -> AbstractResolver:
        """The resolver of a transport's connector: connections go to checked addresses."""
        return _PinnedResolver(self)


class _PinnedResolver(AbstractResolver):
    """aiohttp's resolver interface over :meth:`EndpointGuard.addresses`."""

    def __init__(self, guard: EndpointGuard) -> None:
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        out: list[ResolveResult] = []
        for address in await self._guard.addresses(host, port):
            fam = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            if family not in (socket.AF_UNSPEC, fam):
                continue
            out.append({
                "hostname": host, "host": str(address), "port": port, "family": fam,
                "proto": 0, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            })
        if not out:
            raise OSError(f"{host} has no address of family {family!r}")
        return out

    async def close(self) -> None:
        return None


async def check_node_url(
    node_id: str, url: str, allowlist: EndpointAllowlist, lookup: Lookup = system_lookup
) -> None:
    """Node registration's rule: :class:`RegistrationError` when the endpoint policy with
    the operator's ``allowlist`` (``requester.endpoint_allowlist``) refuses ``url``."""
    try:
        await EndpointGuard.of(allowlist, lookup=lookup, cache_s=0).check_url(url)
    except EndpointRefusedError as exc:
        raise RegistrationError(
            f"node {node_id}: {exc}; to measure it anyway, add its network or host to "
            "requester.endpoint_allowlist (e.g. TESTBENCH_REQUESTER__ENDPOINT_ALLOWLIST="
            "'{networks: [127.0.0.0/8]}' for this machine)") from exc
