"""Time and peak memory of one Manager planning round for N nodes x T tasks.

Anchor: the goal itself (issue #2: ≤ 1 s and ≤ 1 GiB for 10,000 x 10; issue #7: ≤ 5 s
for 100,000 x 10). Buffers are half full with a realistic mix of states (in flight,
backed off, budgets), so the planner does its real work on every pair.

    .venv/bin/python bench/manager_plan.py [--nodes 10000] [--tasks 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.planning import NodeBudget, PairState, PlanLimits, plan_samples  # noqa: E402


def build(n_nodes: int, n_tasks: int, now: float, ttl: float, target: int, seed: int = 0):
    rng = random.Random(seed)
    tasks = [f"task{t}" for t in range(n_tasks)]
    states: dict[tuple[str, str], PairState] = {}
    budgets: dict[str, NodeBudget] = {}
    node_tasks = []
    for n in range(n_nodes):
        node_id = f"node-{n}"
        node_tasks.append((node_id, tasks))
        budgets[node_id] = NodeBudget(window_start=now)
        for task in tasks:
            st = PairState()
            filled = rng.randint(0, target)
            for d in range(filled):
                # some samples are expired and must be dropped by the planner
                st.valid.append((now - rng.uniform(0, ttl * 1.2), d))
            st.valid = type(st.valid)(sorted(st.valid))
            st.in_flight = set(range(1000, 1000 + rng.randint(0, 3)))
            if rng.random() < 0.05:
                st.backoff_until = now + 60
            states[(node_id, task)] = st
    return node_tasks, states, budgets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--goal-s", type=float, default=1.0)
    ap.add_argument("--goal-gib", type=float, default=1.0)
    args = ap.parse_args()
    now, ttl, target = 1_000_000.0, 5 * 86400.0, 50
    limits = PlanLimits(target_samples=target, max_in_flight=10, sample_ttl_s=ttl,
                        node_budget_per_hour=10**9)
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    node_tasks, states, budgets = build(args.nodes, args.tasks, now, ttl, target)
    state_bytes = tracemalloc.get_traced_memory()[0]
    # Memory of one round under tracemalloc; timing without it (tracemalloc slows Python).
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    plan_samples(node_tasks, states, budgets, limits, now)
    peak_round = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    times = []
    planned = 0
    for r in range(args.rounds):
        t0 = time.perf_counter()
        plan = plan_samples(node_tasks, states, budgets, limits, now + 1 + r)
        times.append(time.perf_counter() - t0)
        planned = sum(i.count for i in plan)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pairs = args.nodes * args.tasks
    best = min(times)
    total_gib = (state_bytes + peak_round) / 2**30
    print(f"manager planning round: {args.nodes:,} nodes x {args.tasks} tasks = {pairs:,} pairs")
    print(f"  time per round (best of {args.rounds}): {best:.3f} s   (goal <= {args.goal_s} s, "
          f"ratio to goal {best / args.goal_s:.2f}x)")
    print(f"  planner state: {state_bytes / 2**20:.1f} MiB; extra peak during a round: "
          f"{peak_round / 2**20:.1f} MiB; process max RSS {(rss - rss0) / 2**10:.0f} MiB more "
          f"than at start")
    print(f"  memory (state + round peak): {total_gib:.3f} GiB (goal <= {args.goal_gib} GiB, "
          f"ratio to goal {total_gib / args.goal_gib:.2f}x)")
    print(f"  docs planned in the last round: {planned:,}")
    ok = best <= args.goal_s and total_gib <= args.goal_gib
    print(f"  goal met: {'yes' if ok else 'NO'}")
    from bench_results import report

    report("manager_plan.py", f"planning round, {args.nodes:,} nodes x {args.tasks} tasks",
           f"{best:.3f} s, {total_gib:.3f} GiB", "the goal",
           f"{best / args.goal_s:.2f}x of goal time", f"<= {args.goal_s} s, <= {args.goal_gib} GiB",
           ok)


if __name__ == "__main__":
    main()
