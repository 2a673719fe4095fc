"""Planning: how many docs to draw for each (node, task) on one Manager tick.

need = min(max_in_flight - at the node, target - in flight - valid samples younger than
the TTL): ``max_in_flight`` bounds the docs sent to the node and not yet answered (so a
slow node is not buried), while docs answered and waiting to be scored do not hold the
node back; every doc in flight, scored or not, will fill the buffer, so none is drawn twice;
further limited by task dependencies, the node's hourly budget and failure backoff; a pair
whose docs are being drawn waits for that draw. A pair whose node still has docs is topped
up only once ``refill_docs`` can go (or all it still needs; at most half of
``max_in_flight``): each dispatch costs the loop a Sampler call, a Requester stream and
Evaluator calls, whether it carries one doc or eight.
This is the Manager's hot path (100,000 pairs a round at scale), so it is plain
Python over small slotted objects: no pydantic, no per-pair allocations beyond the
result.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class PairState:
    """What the Manager knows about one (node, task)."""

    # (created_at, doc_id) of valid samples, oldest first; expired ones are dropped lazily.
    valid: deque[tuple[float, int]] = field(default_factory=deque)
    in_flight: set[int] = field(default_factory=set)
    # of those, docs not yet answered by the node (sent, or queued in the Requester)
    at_node: set[int] = field(default_factory=set)
    # docs planned but not yet drawn by a Sampler (their ids are not known yet)
    reserved: int = 0
    # docs whose sample failed on the bench's side this epoch: not redrawn until the next
    skip: set[int] = field(default_factory=set)
    skip_epoch: int = -1
    consecutive_failures: int = 0
    backoff_until: float = 0.0
    # why the pair cannot be measured as configured (None: it can), and how many times
    # in a row drawing failed for such a reason (sets its backoff)
    unmeasurable: str | None = None
    config_failures: int = 0

    def valid_count(self, now: float, ttl_s: float) -> int:
        horizon = now - ttl_s
        valid = self.valid
        while valid and valid[0][0] <= horizon:
            valid.popleft()
        return len(valid)

    def valid_doc_ids(self) -> list[int]:
        return [doc_id for _, doc_id in self.valid]


@dataclass(slots=True)
class NodeBudget:
    """Docs dispatched to a node in the current hour window."""

    window_start: float = 0.0
    used: int = 0

    def remaining(self, now: float, per_hour: int) -> int:
        if now - self.window_start >= 3600.0:
            self.window_start = now
            self.used = 0
        return per_hour - self.used


@dataclass(frozen=True, slots=True)
class PlanLimits:
    target_samples: int
    max_in_flight: int
    sample_ttl_s: float
    node_budget_per_hour: int
    # task -> tasks whose buffers must be full for that node before it is planned (a
    # prerequisite the node is not measured on is ignored)
    dependencies: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # task -> its own buffer size where it differs from target_samples
    task_targets: Mapping[str, int] = field(default_factory=dict)
    # a pair with docs at its node is topped up only once this many can go at once (or all
    # it still needs), at most half of max_in_flight; 1: as soon as any can
    refill_docs: int = 1

    def target(self, task: str) -> int:
        return self.task_targets.get(task, self.target_samples)


@dataclass(frozen=True, slots=True)
class PlanItem:
    node_id: str
    task: str
    count: int


def plan_samples(
    node_tasks: Iterable[tuple[str, Sequence[str]]],
    states: Mapping[tuple[str, str], PairState],
    budgets: Mapping[str, NodeBudget],
    limits: PlanLimits,
    now: float,
) -> list[PlanItem]:
    """Plan one round. ``node_tasks`` yields (node_id, tasks to measure on it).

    Pairs missing from ``states`` are treated as empty. Budgets are consumed here so that
    the caller dispatches exactly what was planned.
    """
    default_target = limits.target_samples
    task_targets = limits.task_targets
    max_in_flight = limits.max_in_flight
    ttl = limits.sample_ttl_s
    per_hour = limits.node_budget_per_hour
    deps = limits.dependencies
    # never more than half the window: the other half keeps the node busy meanwhile
    refill = min(limits.refill_docs, max(1, max_in_flight // 2))
    plan: list[PlanItem] = []
    append = plan.append
    empty = PairState()
    for node_id, tasks in node_tasks:
        budget = budgets.get(node_id)
        remaining = budget.remaining(now, per_hour) if budget is not None else per_hour
        if remaining <= 0:
            continue
        full: dict[str, bool] | None = None
        for task in tasks:
            state = states.get((node_id, task), empty)
            if state.backoff_until > now or state.reserved:
                # backing off, or docs of it are being drawn: their ids are not known yet,
                # so drawing more now could draw the same docs twice
                continue
            required = deps.get(task)
            if required:
                if full is None:
                    full = {}
                blocked = False
                for dep in required:
                    if dep not in tasks:
                        # the node is not measured on it (its registration or the config
                        # leaves it out): nothing to wait for
                        continue
                    ok = full.get(dep)
                    if ok is None:
                        dep_state = states.get((node_id, dep), empty)
                        dep_target = task_targets.get(dep, default_target) if task_targets else default_target
                        ok = full[dep] = dep_state.valid_count(now, ttl) >= dep_target
                    if not ok:
                        blocked = True
                        break
                if blocked:
                    continue
            target = task_targets.get(task, default_target) if task_targets else default_target
            in_flight = len(state.in_flight) + state.reserved
            at_node = len(state.at_node) + state.reserved
            missing = target - in_flight - state.valid_count(now, ttl)
            need = min(max_in_flight - at_node, missing)
            if need <= 0:
                continue
            if at_node and need < refill and need < missing:
                continue  # the node has work: wait until a larger batch can go
            if need > remaining:
                need = remaining
            remaining -= need
            if budget is not None:
                budget.used += need
            append(PlanItem(node_id, task, need))
            if remaining <= 0:
                break
    return plan


def backoff_s(consecutive_failures: int, after: int, base_s: float, max_s: float) -> float:
    """Exponential backoff once a node has failed ``after`` samples in a row."""
    if consecutive_failures < after:
        return 0.0
    return min(max_s, base_s * (2.0 ** (consecutive_failures - after)))
