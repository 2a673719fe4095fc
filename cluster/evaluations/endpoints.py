"""Which endpoints a tenant may evaluate: the endpoint policy per tenant.

The policy (``cluster/nodes/policy.py``) refuses loopback, private, link-local, carrier-grade
NAT, multicast, reserved and cloud-metadata addresses. A tenant's allowlist is
``evaluations.endpoint_allowlists[tenant]`` together with ``evaluations.endpoint_allowlists['*']``;
a tenant with neither reaches public addresses only. The service checks a run's endpoint
when it is submitted (400 ``endpoint_refused``) and the runner relays every request of the
run through the tenant's guard, so the connections go only to checked addresses even if the
name is re-pointed after submission. Runs executed in process (``testbench eval`` without
``--server``) are the operator's own: they use ``requester.endpoint_allowlist``, the
allowlist node registration uses.
"""

from __future__ import annotations

from cluster.core.settings import Settings
from cluster.nodes.policy import EndpointGuard, Lookup, system_lookup


class TenantGuards:
    """One :class:`EndpointGuard` per tenant, built on first use from the settings."""

    def __init__(self, settings: Settings, lookup: Lookup = system_lookup) -> None:
        self._allowlists = settings.evaluations.endpoint_allowlists
        self._lookup = lookup
        self._guards: dict[str, EndpointGuard] = {}

    def for_tenant(self, tenant: str) -> EndpointGuard:
        guard = self._guards.get(tenant)
        if guard is None:
            guard = self._guards[tenant] = EndpointGuard.of(
                self._allowlists.get("*"), self._allowlists.get(tenant), lookup=self._lookup)
        return guard


def operator_guard(settings: Settings, lookup: Lookup = system_lookup) -> EndpointGuard:
    """The guard of runs the operator starts in process (``requester.endpoint_allowlist``)."""
    return EndpointGuard.of(settings.requester.endpoint_allowlist, lookup=lookup)
