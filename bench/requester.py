"""Requester throughput against named anchors, on the same prompts and the same node.

Starts a test node in its own process (``python -m cluster.testing.testnode``, so the server does
not share the clients' event loop) and an embedded MongoDB (``cluster.local.embedded``, the
store ``testbench`` starts when no URL is configured), builds gsm8k requests exactly as
lm-eval 0.4.13's ``local-completions`` does (token ids, its ``_create_payload``), and
measures relays/s for:

- ``requester``: the loop's Requester as the loop builds it
  (``actors/requester.py::loop_requester`` with ``actors/local.py::MongoRelaySink`` over
  ``cluster/storage/connections.py::StoreConnections``): ``relay()`` over all prompts,
  every relay recorded in MongoDB before ``relay()`` returns, as in production;
- ``requester ×N``: the same with ``requester.coalesce_prompts = N`` (``--coalesce``): a
  node's waiting prompts go N to a body (a prompt list), split back into one relay each;
- ``bare aiohttp + sink``: one session, a semaphore, ``gather`` of posts + ``json.loads``,
  then one ``Relay`` per answer recorded through the same sink in one call (the floor of
  relaying *and recording*: the like-for-like anchor of ``requester``);
- ``bare aiohttp``: the same without recording (the HTTP floor; records nothing);
- ``lm-eval http``: lm-eval's own async client, ``TemplateAPI.get_batched_requests``
  (``amodel_call`` + tenacity retry + parsing), with ``num_concurrent`` equal; it keeps
  its answers in memory and records nothing;
- ``lm-eval full``: lm-eval's ``generate_until`` / ``loglikelihood`` on Instances (adds its
  tokenisation and request sorting, which testbench does in the Sampler); records nothing;
- ``lm-eval http ×N``: lm-eval's async client at ``batch_size=N``, its own prompt-list
  batching: the like-for-like anchor of ``requester ×N`` (records nothing).

Every round of a recording client gets prompts with fresh ids (relays are keyed by prompt,
first write wins, so a repeated id would record nothing), stored in MongoDB before the
round's timer starts, as the Sampler stores them before the Requester sees them.

Every client runs on the same default asyncio loop in this process. Each is run
``--rounds`` times, interleaved, after a warm-up and with the setup heap frozen out of the
garbage collector (``gc.freeze``; otherwise a ~100 ms full collection over lm-eval's and
transformers' objects lands on whichever client happens to trigger it). The table shows
each client's best and median round, its lowest CPU time per relay in this process
(what the client itself costs, even when the node is the bottleneck) and the MongoDB
server's CPU per relay (what recording costs beside it); ratios use the best rounds, since
on a shared machine noise only ever slows a round down.
Goals: requester ≥ 0.7× bare aiohttp + sink, ≥ 2× lm-eval (its client as users run it,
batch size 1); the table also shows each requester against the like-for-like lm-eval
anchor. A row is met only when its ratio is and every relay of both clients, in every
round, was OK (failures are counted per client and printed).

Usage: ``.venv/bin/python bench/requester.py [--n 2000] [--concurrency 64]
[--kind generate|loglikelihood] [--rounds 3] [--coalesce 16]
[--only requester "bare + sink"]``
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars: not what we measure
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from actors.local import MongoRelaySink  # noqa: E402
from actors.requester import loop_requester  # noqa: E402
from cluster.core.errors import ErrorCode  # noqa: E402
from cluster.core.schemas import Node, Prompt, Relay  # noqa: E402
from cluster.core.settings import (  # noqa: E402
    EndpointAllowlist,
    RequesterSettings,
    Settings,
    StoreSettings,
)
from cluster.storage.connections import StoreConnections  # noqa: E402

GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]
MODEL = "smollm2"


@dataclass
class Round:
    name: str
    n: int
    ok: int  # relays (answers) that were OK
    wall_s: float
    cpu_s: float  # this process
    store_cpu_s: float  # the MongoDB server's
    records: bool  # the client recorded its relays in MongoDB

    @property
    def store_cpu_us(self) -> float:
        return 1e6 * self.store_cpu_s / self.n

    @property
    def rate(self) -> float:
        return self.n / self.wall_s

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu_s / self.n


def load_docs(n: int) -> list[dict[str, str]]:
    for folder in (ROOT / "datasets" / "gsm8k", Path("/work/shared/datasets/gsm8k")):
        path = folder / "test.jsonl"
        if path.is_file():
            with path.open() as fh:
                docs = [json.loads(line) for line in fh if line.strip()]
            return [docs[i % len(docs)] for i in range(n)]
    raise SystemExit("no gsm8k data found")


def start_node(tokenizer: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "cluster.testing.testnode", "--port", "0", "--tokenizer", tokenizer]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "url=" not in line:
        proc.kill()
        raise SystemExit(f"test node did not start: {line!r}")
    return proc, line.strip().split("url=", 1)[1]


class Workload:
    """The same requests, in each client's own form."""

    def __init__(self, kind: str, n: int, lm: Any) -> None:
        self.kind = kind
        docs = load_docs(n)
        self.gen_kwargs = {"until": GSM8K_UNTIL, "do_sample": False, "temperature": 0.0,
                           "max_gen_toks": 256}
        self.contexts: list[str] = []
        self.continuations: list[str] = []
        self.token_ids: list[list[int]] = []
        self.ctxlens: list[int] = []
        self.bodies: list[dict[str, Any]] = []
        for doc in docs:
            context = f"Question: {doc['question']}\nAnswer:"
            ctx_ids = lm.tok_encode(context)
            if kind == "generate":
                ids = ctx_ids
                body = lm._create_payload(
                    lm.create_message([ids]), generate=True,
                    gen_kwargs=copy.deepcopy(self.gen_kwargs), seed=lm._seed, eos=lm.eos_string,
                )
            else:
                continuation = " " + " ".join(doc["answer"].split()[:12])
                self.continuations.append(continuation)
                ids = ctx_ids + lm.tok_encode(continuation)
                body = lm._create_payload(lm.create_message([ids]), generate=False, seed=lm._seed)
            self.contexts.append(context)
            self.token_ids.append(ids)
            self.ctxlens.append(len(ctx_ids))
            self.bodies.append(body)
        self.max_out = 256 if kind == "generate" else 1

    def prompts(self, tag: str) -> list[Prompt]:
        """The workload as the Sampler's prompts, with ids of their own (``tag``)."""
        return [
            Prompt(
                prompt_id=f"{tag}|gsm8k|{i}|0|0", sample_key=f"{tag}|gsm8k|{i}|0", node_id="bench",
                task="gsm8k", doc_id=i, request_index=0, n_requests=1, path="/v1/completions",
                body=body, prompt_tokens=len(ids), max_output_tokens=self.max_out,
                created_at=time.time(),
            )
            for i, (body, ids) in enumerate(zip(self.bodies, self.token_ids, strict=True))
        ]


@dataclass
class Client:
    name: str
    run: Callable[[Workload, list[Prompt]], Awaitable[int]]
    records: bool  # its relays go through the MongoDB sink


def start_mongo(data_dir: Path) -> tuple[Any, Settings, Callable[[], float]]:
    """The embedded MongoDB ``testbench`` starts when no URL is configured, settings
    pointing at it (the bench needs no PostgreSQL) and a reading of its CPU seconds."""
    import psutil

    from cluster.local.embedded import EmbeddedMongo

    server = EmbeddedMongo(data_dir)
    url = server.start()
    proc = psutil.Process(server.pid)

    def cpu_s() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])

    return server, Settings(stores=StoreSettings(data_dir=data_dir, mongo_url=url)), cpu_s


async def run_requester(url: str, prompts: list[Prompt], concurrency: int,
                        sink: MongoRelaySink, coalesce: int = 1) -> int:
    """The loop's Requester (``loop_requester``) recording through the loop's sink."""
    settings = RequesterSettings(global_concurrency=concurrency, per_node_concurrency=concurrency,
                                 coalesce_prompts=coalesce,
                                 endpoint_allowlist=EndpointAllowlist.loopback())
    requester = loop_requester(settings, sink)
    nodes = {"bench": Node.model_validate({"node_id": "bench", "url": url, "model": MODEL})}
    try:
        relays = await requester.relay(prompts, nodes)
    finally:
        await requester.close()
    return sum(r.error_code == ErrorCode.OK for r in relays)


async def run_bare(url: str, work: Workload, concurrency: int, prompts: list[Prompt] | None = None,
                   sink: MongoRelaySink | None = None) -> int:
    """The floor: post, read, parse, and keep the parsed answers (as a relay must); with a
    sink, also one Relay per answer, recorded through it in one call."""
    endpoint = url + "/v1/completions"
    sem = asyncio.Semaphore(concurrency)
    headers = {"Content-Type": "application/json"}

    async def one(data: bytes) -> tuple[Any, int, float, float]:
        async with sem:
            started = time.time()
            async with session.post(endpoint, data=data, headers=headers) as resp:
                body = await resp.read()
                answer = json.loads(body) if resp.status == 200 else None
                return answer, resp.status, started, time.time()

    datas = [json.dumps(b).encode() for b in work.bodies]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        answers = await asyncio.gather(*(one(d) for d in datas))
    if sink is not None and prompts is not None:
        relays = [
            Relay.model_construct(
                prompt_id=p.prompt_id, sample_key=p.sample_key, node_id=p.node_id, task=p.task,
                doc_id=p.doc_id, request_index=p.request_index,
                error_code=ErrorCode.OK if isinstance(a, dict) else ErrorCode.NODE,
                status=status, error=None, response=a if isinstance(a, dict) else None,
                latency_s=end - start, ttft_s=None, attempts=1, started_at=start,
                finished_at=end,
            )
            for p, (a, status, start, end) in zip(prompts, answers, strict=True)
        ]
        await sink.record_relays(relays)
    return sum(isinstance(a, dict) for a, *_ in answers)


async def run_lmeval_http(lm: Any, work: Workload) -> int:
    keys = [(c, work.gen_kwargs) for c in work.contexts]
    if work.kind == "generate":
        out = await lm.get_batched_requests(
            work.token_ids, keys, generate=True, gen_kwargs=copy.deepcopy(work.gen_kwargs)
        )
    else:
        out = await lm.get_batched_requests(
            work.token_ids, keys, generate=False, ctxlens=work.ctxlens
        )
    return sum(1 for batch in out for answer in batch if answer is not None)


async def run_lmeval_full(lm: Any, work: Workload) -> int:
    from lm_eval.api.instance import Instance

    def call() -> int:
        if work.kind == "generate":
            reqs = [
                Instance("generate_until", {}, (c, copy.deepcopy(work.gen_kwargs)), i)
                for i, c in enumerate(work.contexts)
            ]
            return sum(1 for r in lm.generate_until(reqs, disable_tqdm=True) if r is not None)
        reqs = [
            Instance("loglikelihood", {}, (c, cont), i)
            for i, (c, cont) in enumerate(zip(work.contexts, work.continuations, strict=True))
        ]
        return sum(1 for r in lm.loglikelihood(reqs, disable_tqdm=True) if r is not None)

    # lm-eval drives its own asyncio.run(): give it a thread with no running loop.
    return await asyncio.to_thread(call)


async def measure(client: Client, work: Workload, tag: str, stores: StoreConnections,
                  store_cpu: Callable[[], float]) -> Round:
    """One round of ``client``; a recording client's prompts are stored first (untimed)."""
    prompts = work.prompts(tag)
    if client.records:
        mongo = await stores.mongo()
        await mongo.prompts.insert_many(prompts)
    store0, cpu0, t0 = store_cpu(), time.process_time(), time.perf_counter()
    ok = await client.run(work, prompts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Round(client.name, len(prompts), ok, wall, cpu, store_cpu() - store0, client.records)


def make_lm(url: str, tokenizer: str, concurrency: int, batch_size: int = 1) -> Any:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=url + "/v1/completions",
        model=MODEL,
        tokenizer=tokenizer,
        tokenizer_backend="huggingface",
        num_concurrent=concurrency,
        batch_size=batch_size,
        max_retries=3,
        max_length=4096,
        seed=1234,
    )


async def bench(args: argparse.Namespace, url: str, settings: Settings,
                store_cpu: Callable[[], float]) -> list[list[Round]]:
    stores = StoreConnections(settings)
    try:
        await (await stores.mongo()).ensure_indexes()
        return await _bench(args, url, stores, store_cpu)
    finally:
        await stores.close()


async def _bench(args: argparse.Namespace, url: str, stores: StoreConnections,
                 store_cpu: Callable[[], float]) -> list[list[Round]]:
    sink = MongoRelaySink(stores)
    lm = make_lm(url, args.tokenizer, args.concurrency)
    work = Workload(args.kind, args.n, lm)
    warm = Workload(args.kind, min(args.n, 200), lm)
    c = args.concurrency
    clients = [
        Client("requester", lambda w, p: run_requester(url, p, c, sink), records=True),
        Client("bare + sink", lambda w, p: run_bare(url, w, c, p, sink), records=True),
        Client("bare aiohttp", lambda w, p: run_bare(url, w, c), records=False),
        Client("lm-eval http", lambda w, p: run_lmeval_http(lm, w), records=False),
    ]
    if not args.skip_full:
        clients.append(Client("lm-eval full", lambda w, p: run_lmeval_full(lm, w), records=False))
    if args.coalesce > 1:
        per_body = args.coalesce
        lm_batched = make_lm(url, args.tokenizer, c, batch_size=per_body)
        clients.insert(1, Client(f"requester ×{per_body}",
                                 lambda w, p: run_requester(url, p, c, sink, per_body),
                                 records=True))
        clients.append(Client(f"lm-eval http ×{per_body}",
                              lambda w, p: run_lmeval_http(lm_batched, w), records=False))
    if args.only:
        clients = [x for x in clients if x.name in args.only]
    for k, client in enumerate(clients):
        await measure(client, warm, f"warm{k}", stores, store_cpu)
    if not args.no_gc_freeze:
        # The bench's own heap (lm-eval, transformers, the workloads) is large: a full
        # collection over it costs ~100 ms and lands on whichever client triggers it.
        gc.collect()
        gc.freeze()
    rounds: list[list[Round]] = [[] for _ in clients]
    for r in range(args.rounds):
        for k, client in enumerate(clients):
            rounds[k].append(await measure(client, work, f"r{r}c{k}", stores, store_cpu))
    gc.unfreeze()
    return rounds


def report(args: argparse.Namespace, rounds: list[list[Round]]) -> None:
    """Median and best round per client; ratios from the best rounds (noise only slows)."""
    best = [max(rs, key=lambda r: r.rate) for rs in rounds]
    by = {r.name: r for r in best}
    failed = {rs[0].name: sum(r.n - r.ok for r in rs) for rs in rounds}
    req = by.get("requester", best[0])
    print(
        f"\nrequester bench: kind={args.kind} n={args.n} concurrency={args.concurrency} "
        f"rounds={args.rounds} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} "
        f"python={sys.version.split()[0]}"
    )
    print("records: relays recorded in MongoDB (embedded nx-27017) through the loop's sink "
          "before the call returns; the other clients record nothing")
    print(f"{'client':<18} {'records':>7} {'best r/s':>9} {'median r/s':>11} "
          f"{'min CPU µs/relay':>17} {'MongoDB µs/relay':>16} {'failed':>7} "
          f"{req.name + ' ÷ this':>17}")
    for r, rs in zip(best, rounds, strict=True):
        median = statistics.median(x.rate for x in rs)
        cpu = min(x.cpu_us for x in rs)
        store = min(x.store_cpu_us for x in rs)
        print(f"{r.name:<18} {'yes' if r.records else 'no':>7} {r.rate:>9.0f} "
              f"{median:>11.0f} {cpu:>17.0f} {store:>16.0f} {failed[r.name]:>7} "
              f"{req.rate / r.rate:>16.2f}×")
    print("(CPU: this process; MongoDB: the embedded server's CPU per relay; failed: relays or "
          "answers that were not OK, over all rounds)")
    k = args.coalesce
    for client, anchors in [
        ("requester", [("bare + sink", "goal ≥ 0.7"), ("bare aiohttp", ""),
                       ("lm-eval http", "goal ≥ 2"), ("lm-eval full", "")]),
        (f"requester ×{k}", [("lm-eval http", "goal ≥ 2"), (f"lm-eval http ×{k}", "like for like"),
                             ("bare + sink", "")]),
    ]:
        line = "   ".join(
            f"{client}/{name} = {by[client].rate / by[name].rate:.2f}×" + (f" ({goal})" if goal else "")
            for name, goal in anchors
            if name in by and client in by
        )
        if line:
            print("\n" + line)
    if any(failed.values()):
        print("WARNING: failed relays: " + ", ".join(f"{n} {f}" for n, f in failed.items() if f))
    from bench_results import report

    def row(client: str, figure: str, anchor: str, anchor_label: str, goal: str,
            at_least: float) -> None:
        if client not in by or anchor not in by:
            return
        ratio = by[client].rate / by[anchor].rate
        all_ok = failed[client] == 0 and failed[anchor] == 0
        value = f"{by[client].rate:.0f}/s" + ("" if all_ok else
                                              f", {failed[client]} failed relays")
        report("requester.py", figure, value, anchor_label + (
            "" if failed[anchor] == 0 else f" ({failed[anchor]} failed)"),
            f"{ratio:.2f}x", goal + ", every relay ok", ratio >= at_least and all_ok)

    fig = f"relays/s recorded in MongoDB, test node, {args.kind}"
    row("requester", fig, "bare + sink",
        "bare aiohttp loop recording through the same sink, same run", ">= 0.7x", 0.7)
    row("requester", fig, "lm-eval http", "lm-eval's API client (records nothing), same run",
        ">= 2x", 2.0)
    row(f"requester ×{k}", f"{fig}, coalesce_prompts={k}", "lm-eval http",
        "lm-eval's API client (batch size 1, records nothing), same run", ">= 2x", 2.0)
    row(f"requester ×{k}", f"{fig}, coalesce_prompts={k}", f"lm-eval http ×{k}",
        f"lm-eval's API client at batch_size={k} (records nothing), same run",
        ">= 1x (like for like)", 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="requests per round and client")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--kind", choices=["generate", "loglikelihood"], default="generate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--coalesce", type=int, default=16,
                        help="also run the requester with coalesce_prompts=N (and lm-eval at "
                             "batch_size=N); 1 = skip")
    parser.add_argument("--tokenizer", default=str(ROOT / ".cache" / "models" / "smollm2"))
    parser.add_argument("--url", default=None, help="use a running node instead of starting one")
    parser.add_argument("--no-gc-freeze", action="store_true", help="keep the setup heap in GC")
    parser.add_argument("--only", nargs="*", help="run only these clients (by name)")
    parser.add_argument("--skip-full", action="store_true", help="skip lm-eval's full path")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-requester-"))
    mongo, settings, store_cpu = start_mongo(data_dir)
    proc = None
    url = args.url
    try:
        if url is None:
            proc, url = start_node(args.tokenizer)
        rounds = asyncio.run(bench(args, url, settings, store_cpu))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        mongo.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    report(args, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
