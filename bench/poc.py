"""Proof of compute: Ray-distributed nonce generation against a bare torch loop, and the
validator's cost against the generation it checks.

Anchors (issue #5): the Ray generator reaches >= 0.9x the nonces/s of a bare
single-process torch loop of the same model per CPU used; validating a node (default
200-nonce sample) costs <= 2% of the generation it checks.

Two measures per CPU, both printed:
- wall: nonces/s divided by the CPUs given (the issue's measure; exact on an idle box);
- CPU time: nonces per CPU-second actually consumed — by the bare process, and by the
  Ray worker processes plus the driver that feeds them. On a shared machine (other
  jobs, the kernel's autogroup fair share) wall rates of a multi-process run say more
  about the neighbours than about Ray; CPU time does not.
Ray starts its workers at nice 15; the bench gives them the bare loop's niceness
(``RAY_worker_niceness``) so both sides compete for the CPU alike. Bare and Ray runs alternate (``--repeats``); the ratios are medians of paired runs (each
Ray run against the bare run just before it), with the best-of-runs ratio beside them.

With ``--workers 1,2`` (the default) the 1-worker run is the control: bare loop and Ray
worker then ask for the same single CPU, so their ratio is Ray's own overhead even on a
busy machine; the N-worker run shows the scaling the machine actually grants.

    .venv/bin/python bench/poc.py [--workers 1,2] [--seconds 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.poc.calibration import calibrate_r_target  # noqa: E402
from cluster.poc.compute import PocComputer, configure_torch  # noqa: E402
from cluster.poc.config import PocModelParams, PocRoundParams, ValidationConfig  # noqa: E402
from cluster.poc.validator import ClaimedProof, PocValidator  # noqa: E402

KEY = "bench-node-public-key"


def bare_loop(computer: PocComputer, chunk: int, seconds: float,
              start: int) -> tuple[float, float, int]:
    """(nonces/s wall, nonces per CPU-second, next nonce): one process, one torch thread."""
    n, k = 0, start
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        computer.find_valid(range(k, k + chunk))
        k += chunk
        n += chunk
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, n / cpu, k


def _bare_child(params: PocRoundParams, chunk: int, seconds: float, start: int,
                barrier: Any, out: Any) -> None:
    configure_torch(1)
    computer = PocComputer(params, KEY)
    computer.find_valid(range(start, start + chunk))  # warm-up
    barrier.wait()
    _, cpu_rate, _ = bare_loop(computer, chunk, seconds, start + chunk)
    out.put(cpu_rate)


def bare_side_by_side(params: PocRoundParams, chunk: int, seconds: float, procs: int
                      ) -> float:
    """Nonces per CPU-second of ``procs`` bare loops running at once (the same CPUs busy)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    children = [ctx.Process(target=_bare_child, args=(params, chunk, seconds,
                                                       10**13 + i * 10**10, barrier, out))
                for i in range(procs)]
    for c in children:
        c.start()
    rates = [out.get() for _ in children]
    for c in children:
        c.join()
    return statistics.mean(rates)


async def ray_run(pool: Any, chunk: int, chunks: int,
                  first_chunk: int) -> tuple[float, float, float, list[int], list[float]]:
    """(nonces/s wall, nonces per CPU-second of workers + driver, wall s, valid nonces, dists)."""
    from serve_apps.poc.generator import NoncePlan, PowGenerator

    nonces: list[int] = []
    dist: list[float] = []

    def keep(result: Any) -> None:
        nonces.extend(result.nonces)
        dist.extend(result.distances)

    gen = PowGenerator(pool, NoncePlan(chunk_size=chunk), keep, chunks_in_flight=2,
                       first_chunk=first_chunk)
    workers0 = sum(await pool.cpu_seconds())
    t0, c0 = time.perf_counter(), time.process_time()
    await gen.run(max_chunks=first_chunk + chunks)
    wall, driver_cpu = time.perf_counter() - t0, time.process_time() - c0
    cpu = sum(await pool.cpu_seconds()) - workers0 + driver_cpu
    return gen.nonces_computed / wall, gen.nonces_computed / cpu, wall, nonces, dist


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def measure(params: PocRoundParams, chunk: int, workers: int, seconds: float, repeats: int
            ) -> tuple[list[int], list[float], float]:
    """Alternate bare and Ray runs; print rates and ratios. Returns the last Ray claim."""
    from serve_apps.poc.server import RayWorkerPool
    from serve_apps.poc.worker import PowWorkerSpec

    spec = PowWorkerSpec(round=params, public_key=KEY, threads=1)
    t0 = time.perf_counter()
    pool = RayWorkerPool(spec, workers, cpus_per_worker=1.0)
    digests = asyncio.run(pool.ready())
    startup = time.perf_counter() - t0
    bare_computer = PocComputer(params, KEY)
    assert set(digests) == {bare_computer.weights_digest()}, "workers built other weights"
    bare_computer.find_valid(range(10**12, 10**12 + chunk))  # warm-up

    bare_wall, bare_cpu, ray_wall, ray_cpu = [], [], [], []
    next_bare, next_chunk = 10**12 + chunk, 0
    nonces: list[int] = []
    dist: list[float] = []
    gen_wall = 0.0
    print(f"-- {workers} Ray worker(s) x 1 CPU against the bare loop")
    for _ in range(repeats):
        w, c, next_bare = bare_loop(bare_computer, chunk, seconds, next_bare)
        bare_wall.append(w)
        bare_cpu.append(c)
        chunks = max(workers * 4, int(w * workers * seconds / chunk))
        rw, rc, gen_wall, nonces, dist = asyncio.run(ray_run(pool, chunk, chunks, next_chunk))
        next_chunk += chunks
        ray_wall.append(rw)
        ray_cpu.append(rc)
        print(f"  run: bare {w:7.0f}/s wall, {c:7.0f}/CPU-s   ray {rw:7.0f}/s wall "
              f"({rw / workers:6.0f} per CPU), {rc:7.0f}/CPU-s   ({gen_wall:4.1f} s)")
    asyncio.run(pool.close())
    side = [bare_side_by_side(params, chunk, seconds, workers) for _ in range(2)] if workers > 1 else []

    med, best = statistics.median, max
    print(f"  bare torch loop (1 process, 1 thread): best {best(bare_wall):7.0f} nonces/s "
          f"(median {med(bare_wall):7.0f}) per CPU; best {best(bare_cpu):7.0f} nonces per "
          f"CPU-second (median {med(bare_cpu):7.0f})")
    print(f"  ray generator ({workers} x 1 CPU):          best {best(ray_wall) / workers:7.0f} "
          f"nonces/s (median {med(ray_wall) / workers:7.0f}) per CPU; best {best(ray_cpu):7.0f} "
          f"nonces per CPU-second (median {med(ray_cpu):7.0f}), workers + driver; "
          f"actor start-up {startup:.1f} s not counted")
    # Headline: the median of paired ratios (each Ray run against the bare run just before
    # it, so slow swings of background load cancel); best-of-runs beside it.
    wall_ratio = med([r / workers / b for r, b in zip(ray_wall, bare_wall, strict=True)])
    cpu_ratio = med([r / b for r, b in zip(ray_cpu, bare_cpu, strict=True)])
    print(f"  ratio per CPU, wall:     {wall_ratio:.3f}x (best runs "
          f"{best(ray_wall) / workers / best(bare_wall):.3f}x)  [goal >= 0.9x: "
          f"{verdict(wall_ratio >= 0.9)}]")
    from bench_results import report

    report("poc.py", f"nonces/s per CPU, {workers} Ray worker(s)",
           f"{med(ray_wall) / workers:.0f}/s", "bare single-process torch loop, same run",
           f"{wall_ratio:.2f}x", ">= 0.9x", wall_ratio >= 0.9)
    print(f"  ratio per CPU, CPU time: {cpu_ratio:.3f}x (best runs "
          f"{best(ray_cpu) / best(bare_cpu):.3f}x)  [goal >= 0.9x: {verdict(cpu_ratio >= 0.9)}]")
    if side:
        print(f"  control: {workers} bare loops side by side: best {best(side):7.0f} nonces per "
              f"CPU-second = {best(side) / best(bare_cpu):.3f}x of one bare loop alone (what the "
              f"machine gives {workers} busy CPUs); ray = {best(ray_cpu) / best(side):.3f}x of them")
    return nonces, dist, gen_wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to measure, 1 CPU each")
    ap.add_argument("--seconds", type=float, default=5.0, help="per measured run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--valid-fraction", type=float, default=0.1)
    ap.add_argument("--batches-per-chunk", type=int, default=16)
    ap.add_argument("--dim", type=int, default=PocModelParams().dim)
    ap.add_argument("--layers", type=int, default=PocModelParams().n_layers)
    ap.add_argument("--seq-len", type=int, default=PocModelParams().seq_len)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    import ray

    configure_torch(1)
    model = PocModelParams(dim=args.dim, n_layers=args.layers, seq_len=args.seq_len)
    seed = "bench-round-seed"
    r_target = calibrate_r_target(seed, model, args.valid_fraction, batch_size=args.batch_size)
    params = PocRoundParams(seed=seed, model=model, r_target=r_target, batch_size=args.batch_size)
    chunk = args.batch_size * args.batches_per_chunk
    print(f"poc bench: model {model.model_dump()} batch {args.batch_size}, chunk {chunk} nonces, "
          f"r_target {r_target:.5f} (valid {args.valid_fraction:.0%})")

    # Ray starts workers at nice 15; the bare loop runs at this process's niceness. Same
    # priority on both sides, or a busy machine measures the scheduler, not Ray.
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    ray.init(num_cpus=max(4, *counts), include_dashboard=False, log_to_driver=False)
    print(f"worker niceness {os.environ['RAY_worker_niceness']} (bare loop: {os.nice(0)})")
    for workers in counts:
        nonces, dist, gen_wall = measure(params, chunk, workers, args.seconds, args.repeats)
    ray.shutdown()

    # Validation of the last Ray run's claim (all its valid nonces), default sample size.
    cfg = ValidationConfig()
    validator = PocValidator(PocComputer(params, "validator"), cfg)
    claim = ClaimedProof(node_id="bench", public_key=KEY, nonces=nonces, distances=dist)
    validator.validate(claim, sample_seed=0)  # warm-up
    times = []
    for s in range(5):
        t0 = time.perf_counter()
        result = validator.validate(claim, sample_seed=s + 1)
        times.append(time.perf_counter() - t0)
        assert not result.fraud and result.n_mismatch == 0
    val_s = statistics.median(times)
    frac_wall = val_s / gen_wall
    frac_cpu = val_s / (gen_wall * counts[-1])
    print(f"validation: {cfg.sample_size} of {len(nonces)} claimed nonces in {val_s * 1000:.1f} ms "
          f"on 1 CPU = {frac_wall:.3%} of the {gen_wall:.1f} s generation it checks "
          f"({frac_cpu:.3%} of its CPU time)  [goal <= 2%: {verdict(frac_wall <= 0.02)}]")
    print(f"  (2% is reached only by rounds shorter than {val_s / 0.02:.2f} s of generation)")
    from bench_results import report

    report("poc.py", "validation time / generation time", f"{val_s * 1000:.1f} ms",
           "the generation it checks, same run", f"{frac_wall:.2%}", "<= 2%", frac_wall <= 0.02)


if __name__ == "__main__":
    main()
