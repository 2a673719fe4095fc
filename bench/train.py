"""DiLoCo training on Ray Train: throughput against a bare torch loop, and the bytes one
outer step sends between MLNodes against plain data-parallel all-reduce.

Goals: training tokens/s per CPU through Ray Train (the MLNode's own path,
``serve_apps/poc/training.py`` -> ``cluster/train/loop.py``) >= 0.9x a bare single-process
torch loop of the same model on the same batches; and per outer step, each node sends
>= H times fewer bytes with DiLoCo than plain data-parallel training would all-reduce over
the same H inner steps.

Throughput (SmolLM2-135M by default): the bare loop runs in a child process with one torch
thread: AdamW steps (clip 1.0) over the batches the 1-worker Ray run gets, each step timed.
The Ray runs are one outer step of H inner steps on 1 and on N workers of 1 CPU and 1 thread
each (``--workers``); their rate is the one the node reports (rank 0's inner-step time, the
node's tokens), divided by the CPUs it was given. Both sides count the same H steps, the
first (cold) one included; start-up, the outer sync, the checkpoint and the export are
outside both windows and printed separately for the Ray runs. Ray starts workers at nice
15: the bench gives them the bare loop's niceness (``RAY_worker_niceness``).

Bytes (the tiny model of SmolLM2's architecture, cluster/testing/tiny_lm.py, so two nodes
fit beside each other): two MLNode apps on Ray Serve train one run of 2 outer steps of H
inner steps; each node's bytes per outer step are what its peer channel put on the wire
(body + sync headers, every attempt; PeerStatus.bytes_sent / outer steps). The anchor is a
real data-parallel run of the same model, H steps on 2 Ray Train workers (gloo), its fp32
gradients all-reduced every step: a node sends 2(n-1)/n of the bytes it all-reduces (ring).

    .venv/bin/python bench/train.py [--model smollm2|tiny] [--steps 6] [--workers 1,2] [--h 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_results import report  # noqa: E402

from cluster.core.settings import PROJECT_ROOT  # noqa: E402

GSM8K = PROJECT_ROOT / "datasets" / "gsm8k" / "train.jsonl"
CACHE = PROJECT_ROOT / ".cache"


def model_dir(name: str) -> Path:
    from cluster.local.models import prepare_smollm2

    smollm2 = prepare_smollm2(CACHE)
    if name == "smollm2":
        return smollm2
    from cluster.testing.tiny_lm import build_tiny_lm

    return build_tiny_lm(smollm2, CACHE / "models" / "tiny-smollm2")


def run_config(run_id: str, model: Path, out: Path, args: argparse.Namespace,
               inner_steps: int, outer_steps: int, peers: list[dict[str, str]] | None = None,
               ) -> dict[str, Any]:
    return {
        "run_id": run_id, "model": str(model), "output_dir": str(out), "peers": peers or [],
        "dataset": {"files": [str(GSM8K)], "text_fields": ["question", "answer"],
                    "max_docs": args.docs, "heldout_blocks": 2},
        "hyperparameters": {"seq_len": args.seq_len, "micro_batch_size": args.batch,
                            "inner_steps": inner_steps, "outer_steps": outer_steps,
                            "inner_lr": 1e-4, "sync_dtype": args.sync_dtype},
    }


# ---- throughput ---------------------------------------------------------------------------
def _bare_child(model: str, data_file: str, seq_len: int, batch: int, steps: int,
                out: Any) -> None:
    import torch

    from cluster.train.data import DataCursor, PackedCorpus, ShardedBatches, read_snapshot
    from cluster.train.loop import configure_torch, load_model

    configure_torch(1)
    net, tokenizer = load_model(model, "cpu")
    corpus = PackedCorpus.pack(read_snapshot(data_file), tokenizer, seq_len, 2)
    batches = ShardedBatches(corpus.train, 0, 0, 1, 0, 1, batch)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    cursor, busy, tokens = DataCursor(), 0.0, 0
    for _ in range(steps):
        started = time.perf_counter()
        x, cursor = batches.next(cursor)
        loss = net(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        busy += time.perf_counter() - started
        tokens += x.numel()
    out.put(tokens / busy)


def bare_tokens_per_s(model: Path, data_file: str, args: argparse.Namespace) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_bare_child, args=(str(model), data_file, args.seq_len,
                                                  args.batch, args.steps, queue))
    child.start()
    rate = queue.get(timeout=3600)
    child.join()
    return float(rate)


async def ray_run(run: dict[str, Any], workers: int) -> tuple[Any, float]:
    """One run through the MLNode's launcher; (final progress, seconds to the end)."""
    from cluster.auth.keys import Ed25519Key
    from cluster.train.config import ScalingSpec, TrainRunConfig
    from serve_apps.poc.training import RayTrainingLauncher

    scaling = ScalingSpec(workers=workers, cpus_per_worker=1, threads_per_worker=1,
                          max_failures=0)
    handle = RayTrainingLauncher(scaling, None, 1 << 31).start(
        TrainRunConfig.model_validate(run), Ed25519Key.generate())
    started = time.monotonic()
    while not handle.done():
        await asyncio.sleep(0.5)
    final = await handle.status()
    await handle.close()
    return final, time.monotonic() - started


def throughput(args: argparse.Namespace, work: Path) -> None:
    import ray

    from cluster.train.config import TrainRunConfig
    from cluster.train.data import snapshot_dataset

    model = model_dir(args.model)
    print(f"== throughput: {args.model} ({model}), seq_len {args.seq_len}, batch {args.batch}, "
          f"{args.steps} inner steps per run")
    first = TrainRunConfig.model_validate(run_config("bare", model, work / "bare", args,
                                                     args.steps, 1))
    data = asyncio.run(snapshot_dataset(first.dataset, first.data_file)).path
    bare = bare_tokens_per_s(model, data, args)
    print(f"bare torch loop, 1 thread: {bare:,.1f} tokens/s")
    for workers in args.workers:
        if not ray.is_initialized():
            ray.init(num_cpus=max(4, 2 * max(args.workers)), include_dashboard=False,
                     log_to_driver=False)
        run = run_config(f"bench-{workers}w", model, work / f"ray{workers}", args,
                         args.steps, 1)
        final, took = asyncio.run(ray_run(run, workers))
        if final.state.value != "COMPLETED":
            raise SystemExit(f"Ray run with {workers} workers ended {final.state}: {final.error}")
        per_cpu = final.tokens_per_s / workers
        print(f"Ray Train, {workers} worker(s) x 1 CPU: {final.tokens_per_s:,.1f} tokens/s "
              f"({per_cpu:,.1f} per CPU); run took {took:.1f} s end to end "
              f"(start-up, sync, checkpoint, export included)")
        ratio = per_cpu / bare
        report("train.py", f"training tokens/s per CPU, {args.model}, {workers} Ray Train "
               f"worker(s)", f"{per_cpu:,.1f}/s", "bare single-process torch loop, same run",
               f"{ratio:.2f}x", ">= 0.9x", ratio >= 0.9)
        shutil.rmtree(work / f"ray{workers}", ignore_errors=True)


# ---- bytes per outer step ---------------------------------------------------------------
def dp_worker(config: dict[str, Any]) -> None:
    """Plain data parallelism: every step's fp32 gradients all-reduced (counted)."""
    import ray.train
    import torch
    import torch.distributed as dist

    from cluster.train.data import DataCursor, PackedCorpus, ShardedBatches, read_snapshot
    from cluster.train.loop import configure_torch, load_model

    configure_torch(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    net, tokenizer = load_model(config["model"], "cpu")
    corpus = PackedCorpus.pack(read_snapshot(config["data"]), tokenizer, config["seq_len"], 2)
    batches = ShardedBatches(corpus.train, 0, 0, 1, rank, world, config["batch"])
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cursor, reduced = DataCursor(), 0
    for _ in range(config["steps"]):
        x, cursor = batches.next(cursor)
        net(input_ids=x, labels=x).loss.backward()
        for p in params:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
            reduced += p.grad.numel() * p.grad.element_size()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # Ray Train v2 keeps reported metrics only with a checkpoint: rank 0 writes its count
    if rank == 0:
        Path(config["out"]).write_text(str(reduced), encoding="utf-8")


def dp_bytes_per_node(model: Path, data_file: str, args: argparse.Namespace,
                      work: Path) -> tuple[int, int]:
    """(bytes all-reduced per worker over H steps, bytes each node sends for them)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    nodes = 2
    trainer = TorchTrainer(
        dp_worker, train_loop_config={"model": str(model), "data": data_file,
                                      "seq_len": args.seq_len, "batch": args.batch,
                                      "steps": args.h, "out": str(work / "dp_bytes.txt")},
        scaling_config=ScalingConfig(num_workers=nodes, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="bench-dp", storage_path=str(work / "dp")))
    trainer.fit()
    reduced = int((work / "dp_bytes.txt").read_text(encoding="utf-8"))
    return reduced, reduced * 2 * (nodes - 1) // nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def diloco_bytes_per_node(model: Path, args: argparse.Namespace, work: Path) -> tuple[float, Any]:
    """Two MLNode apps train one run of 2 outer steps: each node's bytes per outer step."""
    import httpx
    from ray import serve

    from cluster.auth.keys import Ed25519Key
    from serve_apps.poc.server import build_poc_node_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    keys = [Ed25519Key.generate() for _ in range(2)]
    urls = [f"http://127.0.0.1:{port}/bench-mlnode-{i}" for i in range(2)]
    for i, key in enumerate(keys):
        serve.run(build_poc_node_app({
            "auth": {"enabled": False},
            "training": {"node_key_hex": key.seed_hex,
                         "scaling": {"workers": 1, "cpus_per_worker": 1,
                                     "threads_per_worker": 1}}}),
            name=f"bench-mlnode-{i}", route_prefix=f"/bench-mlnode-{i}")
    outer_steps = 2
    for i in range(2):
        peers = [{"public_key": keys[1 - i].public_key, "url": urls[1 - i]}]
        body = run_config("bench-diloco", model, work / f"diloco{i}", args, args.h, outer_steps,
                          peers)
        httpx.post(f"{urls[i]}/api/v1/train/start", json=body, timeout=60).raise_for_status()
    deadline = time.monotonic() + 1800
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        states = [httpx.get(f"{u}/api/v1/train/status", timeout=60).json() for u in urls]
        runs = [s["run"] or {} for s in states]
        if all(s["node_state"] != "TRAIN" for s in states):
            break
        time.sleep(1)
    for i in range(2):
        serve.delete(f"bench-mlnode-{i}")
    if not all(r.get("state") == "COMPLETED" for r in runs):
        raise SystemExit(f"DiLoCo runs ended {[(r.get('state'), r.get('error')) for r in runs]}")
    sent = [r["peers"][0]["bytes_sent"] / outer_steps for r in runs]
    return max(sent), runs[0]


def exchange(args: argparse.Namespace, work: Path) -> None:
    import ray

    from cluster.train.config import TrainRunConfig
    from cluster.train.data import snapshot_dataset

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    model = model_dir("tiny")
    print(f"== bytes per outer step: tiny model ({model}), H = {args.h} inner steps, "
          f"sync dtype {args.sync_dtype}, 2 nodes")
    first = TrainRunConfig.model_validate(run_config("dp", model, work / "dpdata", args, 1, 1))
    data = asyncio.run(snapshot_dataset(first.dataset, first.data_file)).path
    reduced, dp_sent = dp_bytes_per_node(model, data, args, work)
    print(f"plain data parallel (fp32 gradients, gloo ring, 2 workers): {reduced:,} bytes "
          f"all-reduced per worker over {args.h} steps -> {dp_sent:,} bytes sent per node")
    diloco_sent, run = diloco_bytes_per_node(model, args, work)
    print(f"DiLoCo over two MLNodes: {diloco_sent:,.0f} bytes sent per node per outer step "
          f"(peer {run['peers'][0]['public_key'][:16]}.., both runs COMPLETED, "
          f"params {run['params_sha256'][:16]}..)")
    ratio = dp_sent / diloco_sent
    report("train.py", f"bytes sent per node per outer step, H={args.h}, DiLoCo "
           f"({args.sync_dtype} pseudo-gradients)", f"{diloco_sent:,.0f} B",
           f"plain data-parallel all-reduce (fp32) over the same {args.h} steps, same run "
           f"({dp_sent:,} B)", f"{ratio:.2f}x less", f">= {args.h}x less (H)", ratio >= args.h)
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[args.sync_dtype]
    like = dp_sent * width / 4 / diloco_sent
    print(f"like for like (data parallel all-reducing in {args.sync_dtype} too): {like:.4f}x "
          f"less; the rest of the gap is DiLoCo's one message per outer step instead of one "
          f"all-reduce per inner step (H = {args.h}), minus its {args.sync_dtype} header bytes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--steps", type=int, default=6, help="inner steps timed per run")
    ap.add_argument("--workers", default="1,2", help="Ray Train worker counts to measure")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2, help="blocks per step per worker")
    ap.add_argument("--docs", type=int, default=400, help="gsm8k documents in the data")
    ap.add_argument("--h", type=int, default=8, help="inner steps per outer step (bytes)")
    ap.add_argument("--sync-dtype", choices=["float32", "bfloat16", "float16"],
                    default="float16")
    ap.add_argument("--only", choices=["throughput", "bytes"])
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        if args.only in (None, "throughput"):
            throughput(args, work)
        if args.only in (None, "bytes"):
            exchange(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
