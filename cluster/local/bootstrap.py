"""Bootstrap: stores (embedded or external) and Ray (local or ``RAY_ADDRESS``).

A process that starts the embedded servers records their URLs in
``<data_dir>/stores.json``; other processes (CLI commands while ``testbench up`` runs)
reuse them while they answer, instead of starting a second copy on the same data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from cluster.core.settings import Settings
from cluster.local.embedded import EmbeddedStores

log = logging.getLogger(__name__)


def _state_file(settings: Settings) -> Path:
    return Path(settings.stores.data_dir) / "stores.json"


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port
    if port is None or host.startswith("/"):
        return False
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def running_store_urls(settings: Settings) -> tuple[str, str] | None:
    path = _state_file(settings)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        pg, mongo = data["postgres_url"], data["mongo_url"]
    except (ValueError, KeyError):
        return None
    if _reachable(pg) and _reachable(mongo):
        return pg, mongo
    return None


@contextlib.contextmanager
def stores_running(settings: Settings, publish: bool = False) -> Iterator[Settings]:
    """Yield settings whose store URLs point at running servers.

    External URLs are used as given; otherwise servers already published by another
    process are reused; otherwise the embedded servers are started here (and stopped
    on exit). ``publish`` records their URLs for other processes.
    """
    stores = settings.stores
    if stores.postgres_url and stores.mongo_url:
        yield settings
        return
    running = running_store_urls(settings)
    if running is not None and not publish:
        pg, mongo = running
        yield settings.model_copy(update={"stores": stores.model_copy(update={
            "postgres_url": stores.postgres_url or pg, "mongo_url": stores.mongo_url or mongo})})
        return
    embedded = EmbeddedStores(stores, cpu_policy=settings.ray.loop_cpu_policy)
    resolved = embedded.start()
    state = _state_file(settings)
    try:
        if publish:
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(json.dumps({"postgres_url": resolved.postgres_url,
                                         "mongo_url": resolved.mongo_url, "pid": os.getpid()}))
        yield settings.model_copy(update={"stores": resolved})
    finally:
        if publish:
            with contextlib.suppress(FileNotFoundError):
                state.unlink()
        embedded.stop()


def init_ray(settings: Settings) -> None:
    """Connect to ``settings.ray.address`` / ``RAY_ADDRESS``, or start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = settings.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=settings.ray.namespace, log_to_driver=False)
    else:
        ray.init(
            num_cpus=settings.ray.num_cpus,
            namespace=settings.ray.namespace,
            include_dashboard=False,
            log_to_driver=False,
        )
    log.info("ray.ready address=%s namespace=%s", address or "local", settings.ray.namespace)
