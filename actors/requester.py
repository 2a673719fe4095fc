"""The loop's Requester stage: the node client of ``cluster/nodes/requester.py`` with the
loop's metrics attached. Everything that relays prompts for the running system (the loop,
the evaluation service) builds its Requester here, so its relays are counted."""

from __future__ import annotations

from collections.abc import Sequence

from actors import metrics
from cluster.core.schemas import Relay
from cluster.core.settings import RequesterSettings
from cluster.nodes.requester import RelaySink, Requester


class MetricsObserver:
    """Feeds the Requester's queue depth and finished relays to ``actors/metrics.py``."""

    def queue_changed(self, pending: int, in_flight: int) -> None:
        metrics.set_requester_queue(pending, in_flight)

    def relays_done(self, relays: Sequence[Relay]) -> None:
        metrics.record_relays(relays)


def loop_requester(
    settings: RequesterSettings, relay_sink: RelaySink | None = None, *, quote_bodies: bool = True
) -> Requester:
    """``quote_bodies=False``: error texts never quote what a node answered (the evaluation
    service, whose tenants read them)."""
    return Requester(settings, relay_sink, observer=MetricsObserver(), quote_bodies=quote_bodies)


__all__ = ["MetricsObserver", "Requester", "loop_requester"]
