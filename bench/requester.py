"""Requester throughput against named anchors, on the same prompts and the same node.

Starts a test node in its own process (``python -m cluster.testing.testnode``, so the server does
not share the clients' event loop), builds gsm8k requests exactly as lm-eval 0.4.13's
``local-completions`` does (token ids, its ``_create_payload``), and measures relays/s for:

- ``requester``: testbench's ``cluster.nodes.requester.Requester`` (``relay()`` over all prompts);
- ``requester ×N``: the same with ``requester.coalesce_prompts = N`` (``--coalesce``): a
  node's waiting prompts go N to a body (a prompt list), split back into one relay each;
- ``bare aiohttp``: one session, a semaphore, ``gather`` of posts + ``json.loads``, keeping
  the parsed answers as a relay does (the floor);
- ``lm-eval http``: lm-eval's own async client, ``TemplateAPI.get_batched_requests``
  (``amodel_call`` + tenacity retry + parsing), with ``num_concurrent`` equal;
- ``lm-eval full``: lm-eval's ``generate_until`` / ``loglikelihood`` on Instances (adds its
  tokenisation and request sorting, which testbench does in the Sampler);
- ``lm-eval http ×N``: lm-eval's async client at ``batch_size=N``, its own prompt-list
  batching: the like-for-like anchor of ``requester ×N``.

Every client runs on the same default asyncio loop in this process. Each is run
``--rounds`` times, interleaved, after a warm-up and with the setup heap frozen out of the
garbage collector (``gc.freeze``; otherwise a ~100 ms full collection over lm-eval's and
transformers' objects lands on whichever client happens to trigger it). The table shows
each client's best and median round and its lowest CPU time per relay in this process
(what the client itself costs, even when the node is the bottleneck); ratios use the best
rounds, since on a shared machine noise only ever slows a round down.
Goals: requester ≥ 0.7× bare aiohttp, ≥ 2× lm-eval (its client as users run it, batch
size 1); the table also shows each requester against the like-for-like lm-eval anchor.

Usage: ``.venv/bin/python bench/requester.py [--n 2000] [--concurrency 64]
[--kind generate|loglikelihood] [--rounds 3] [--coalesce 16] [--only requester "bare aiohttp"]``
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
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

from cluster.core.errors import ErrorCode  # noqa: E402
from cluster.core.schemas import Node, Prompt  # noqa: E402
from cluster.core.settings import RequesterSettings  # noqa: E402
from cluster.nodes.requester import Requester  # noqa: E402

GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]
MODEL = "smollm2"


@dataclass
class Round:
    name: str
    n: int
    ok: int
    wall_s: float
    cpu_s: float

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
        self.prompts = [
            Prompt(
                prompt_id=f"bench|gsm8k|{i}|0|0", sample_key=f"bench|gsm8k|{i}|0", node_id="bench",
                task="gsm8k", doc_id=i, request_index=0, n_requests=1, path="/v1/completions",
                body=body, prompt_tokens=len(ids), max_output_tokens=self.max_out, created_at=0.0,
            )
            for i, (body, ids) in enumerate(zip(self.bodies, self.token_ids, strict=True))
        ]


async def run_requester(url: str, work: Workload, concurrency: int, coalesce: int = 1) -> int:
    settings = RequesterSettings(global_concurrency=concurrency, per_node_concurrency=concurrency,
                                 coalesce_prompts=coalesce)
    requester = Requester(settings)
    nodes = {"bench": Node.model_validate({"node_id": "bench", "url": url, "model": MODEL})}
    try:
        relays = await requester.relay(work.prompts, nodes)
    finally:
        await requester.close()
    return sum(r.error_code == ErrorCode.OK for r in relays)


async def run_bare(url: str, work: Workload, concurrency: int) -> int:
    """The floor: post, read, parse, and keep the parsed answers (as a relay must)."""
    endpoint = url + "/v1/completions"
    sem = asyncio.Semaphore(concurrency)
    headers = {"Content-Type": "application/json"}

    async def one(data: bytes) -> Any:
        async with sem, session.post(endpoint, data=data, headers=headers) as resp:
            body = await resp.read()
            return json.loads(body) if resp.status == 200 else None

    datas = [json.dumps(b).encode() for b in work.bodies]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        answers = await asyncio.gather(*(one(d) for d in datas))
    return sum(isinstance(a, dict) for a in answers)


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


async def measure(
    name: str, n: int, fn: Callable[[Workload], Awaitable[int]], work: Workload
) -> Round:
    cpu0, t0 = time.process_time(), time.perf_counter()
    ok = await fn(work)
    return Round(name, n, ok, time.perf_counter() - t0, time.process_time() - cpu0)


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


async def bench(args: argparse.Namespace, url: str) -> list[list[Round]]:
    lm = make_lm(url, args.tokenizer, args.concurrency)
    work = Workload(args.kind, args.n, lm)
    warm = Workload(args.kind, min(args.n, 200), lm)
    c = args.concurrency
    clients: list[tuple[str, Callable[[Workload], Awaitable[int]]]] = [
        ("requester", lambda w: run_requester(url, w, c)),
        ("bare aiohttp", lambda w: run_bare(url, w, c)),
        ("lm-eval http", lambda w: run_lmeval_http(lm, w)),
    ]
    if not args.skip_full:
        clients.append(("lm-eval full", lambda w: run_lmeval_full(lm, w)))
    if args.coalesce > 1:
        per_body = args.coalesce
        lm_batched = make_lm(url, args.tokenizer, c, batch_size=per_body)
        clients.insert(1, (f"requester ×{per_body}",
                           lambda w: run_requester(url, w, c, per_body)))
        clients.append((f"lm-eval http ×{per_body}", lambda w: run_lmeval_http(lm_batched, w)))
    if args.only:
        clients = [c for c in clients if c[0] in args.only]
    for _, fn in clients:
        await fn(warm)
    if not args.no_gc_freeze:
        # The bench's own heap (lm-eval, transformers, the workloads) is large: a full
        # collection over it costs ~100 ms and lands on whichever client triggers it.
        gc.collect()
        gc.freeze()
    rounds: list[list[Round]] = [[] for _ in clients]
    for _ in range(args.rounds):
        for k, (name, fn) in enumerate(clients):
            rounds[k].append(await measure(name, args.n, fn, work))
    gc.unfreeze()
    return rounds


def report(args: argparse.Namespace, rounds: list[list[Round]]) -> None:
    """Median and best round per client; ratios from the best rounds (noise only slows)."""
    best = [max(rs, key=lambda r: r.rate) for rs in rounds]
    by = {r.name: r for r in best}
    req = by.get("requester", best[0])
    print(
        f"\nrequester bench: kind={args.kind} n={args.n} concurrency={args.concurrency} "
        f"rounds={args.rounds} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} "
        f"python={sys.version.split()[0]}"
    )
    print(f"{'client':<14} {'best r/s':>9} {'median r/s':>11} {'min CPU µs/relay':>17} "
          f"{'ok':>6} {req.name + ' ÷ this':>17}")
    for r, rs in zip(best, rounds, strict=True):
        median = statistics.median(x.rate for x in rs)
        cpu = min(x.cpu_us for x in rs)
        print(f"{r.name:<14} {r.rate:>9.0f} {median:>11.0f} {cpu:>17.0f} {r.ok:>6} "
              f"{req.rate / r.rate:>16.2f}×")
    k = args.coalesce
    for client, anchors in [
        ("requester", [("bare aiohttp", "goal ≥ 0.7"), ("lm-eval http", "goal ≥ 2"),
                       ("lm-eval full", "")]),
        (f"requester ×{k}", [("lm-eval http", "goal ≥ 2"), (f"lm-eval http ×{k}", "like for like"),
                             ("bare aiohttp", "")]),
    ]:
        line = "   ".join(
            f"{client}/{name} = {by[client].rate / by[name].rate:.2f}×" + (f" ({goal})" if goal else "")
            for name, goal in anchors
            if name in by and client in by
        )
        if line:
            print("\n" + line)
    if any(r.ok != r.n for rs in rounds for r in rs):
        print("WARNING: some requests failed in some rounds")
    from bench_results import report

    if "requester" in by and "bare aiohttp" in by:
        ratio = req.rate / by["bare aiohttp"].rate
        report("requester.py", f"relays/s, test node, {args.kind}", f"{req.rate:.0f}/s",
               "bare aiohttp loop, same run", f"{ratio:.2f}x", ">= 0.7x", ratio >= 0.7)
    if "requester" in by and "lm-eval http" in by:
        ratio = req.rate / by["lm-eval http"].rate
        report("requester.py", f"relays/s, test node, {args.kind}", f"{req.rate:.0f}/s",
               "lm-eval's API client, same run", f"{ratio:.2f}x", ">= 2x", ratio >= 2.0)
    k = args.coalesce
    coalesced, lm_k = by.get(f"requester ×{k}"), by.get(f"lm-eval http ×{k}")
    if coalesced is not None and "lm-eval http" in by:
        ratio = coalesced.rate / by["lm-eval http"].rate
        report("requester.py", f"relays/s, test node, {args.kind}, coalesce_prompts={k}",
               f"{coalesced.rate:.0f}/s", "lm-eval's API client (batch size 1), same run",
               f"{ratio:.2f}x", ">= 2x", ratio >= 2.0)
    if coalesced is not None and lm_k is not None:
        ratio = coalesced.rate / lm_k.rate
        report("requester.py", f"relays/s, test node, {args.kind}, coalesce_prompts={k}",
               f"{coalesced.rate:.0f}/s", f"lm-eval's API client at batch_size={k}, same run",
               f"{ratio:.2f}x", ">= 1x (like for like)", ratio >= 1.0)


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
    proc = None
    url = args.url
    if url is None:
        proc, url = start_node(args.tokenizer)
    try:
        rounds = asyncio.run(bench(args, url))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    report(args, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
