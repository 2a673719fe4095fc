from actors.planning import NodeBudget, PairState, PlanItem, PlanLimits, backoff_s, plan_samples

NOW = 1_000_000.0
TTL = 1000.0


def limits(**kw: object) -> PlanLimits:
    base: dict = dict(target_samples=50, max_in_flight=10, sample_ttl_s=TTL,
                      node_budget_per_hour=10_000)
    base.update(kw)
    return PlanLimits(**base)


def state(valid: int = 0, in_flight: int = 0, expired: int = 0, answered: int = 0) -> PairState:
    """``in_flight`` docs sent and still at the node; of those, ``answered`` already
    answered and waiting to be scored (in flight, no longer at the node)."""
    s = PairState()
    for i in range(expired):
        s.valid.append((NOW - TTL - 1 - i, 1000 + i))
    s.valid = type(s.valid)(sorted(s.valid))
    for i in range(valid):
        s.valid.append((NOW - 10 + i * 0.001, i))
    s.in_flight = set(range(500, 500 + in_flight))
    s.at_node = set(range(500 + answered, 500 + in_flight))
    return s


def test_need_is_bounded_by_in_flight_limit_and_target() -> None:
    states = {("a", "t"): state(valid=0), ("b", "t"): state(valid=45), ("c", "t"): state(valid=50),
              ("d", "t"): state(valid=10, in_flight=8)}
    plan = plan_samples([(n, ["t"]) for n in "abcd"], states, {}, limits(), NOW)
    assert plan == [PlanItem("a", "t", 10), PlanItem("b", "t", 5), PlanItem("d", "t", 2)]


def test_expired_samples_do_not_count_and_are_dropped() -> None:
    s = state(valid=45, expired=20)
    plan = plan_samples([("a", ["t"])], {("a", "t"): s}, {}, limits(), NOW)
    assert plan == [PlanItem("a", "t", 5)]
    assert len(s.valid) == 45


def test_docs_in_flight_count_towards_the_target() -> None:
    plan = plan_samples([("a", ["t"])], {("a", "t"): state(valid=45, in_flight=3)}, {},
                        limits(), NOW)
    assert plan == [PlanItem("a", "t", 2)]


def test_answered_docs_waiting_for_scoring_free_the_node_but_still_fill_the_buffer() -> None:
    # 10 in flight, 8 of them answered: the node has room for 8 more, but the buffer
    # (target 50, 35 valid) needs only 5 beyond the 10 that will land.
    s = state(valid=35, in_flight=10, answered=8)
    assert plan_samples([("a", ["t"])], {("a", "t"): s}, {}, limits(), NOW) == [
        PlanItem("a", "t", 5)]
    s = state(valid=0, in_flight=10, answered=8)
    assert plan_samples([("a", ["t"])], {("a", "t"): s}, {}, limits(), NOW) == [
        PlanItem("a", "t", 8)]


def test_a_pair_being_drawn_is_not_planned_again_until_its_draw_returns() -> None:
    s = state()
    s.reserved = 1
    assert plan_samples([("a", ["t"])], {("a", "t"): s}, {}, limits(), NOW) == []


def test_reserved_docs_count_as_in_flight() -> None:
    s = state()
    s.reserved = 10
    assert plan_samples([("a", ["t"])], {("a", "t"): s}, {}, limits(), NOW) == []


def test_backed_off_pairs_are_skipped_until_backoff_ends() -> None:
    s = state()
    s.backoff_until = NOW + 5
    assert plan_samples([("a", ["t"])], {("a", "t"): s}, {}, limits(), NOW) == []
    assert plan_samples([("a", ["t"])], {("a", "t"): s}, {}, limits(), NOW + 6) == [
        PlanItem("a", "t", 10)]


def test_dependencies_gate_a_task_until_its_prerequisite_is_full() -> None:
    lim = limits(dependencies={"bench": ["signature"]})
    states = {("a", "signature"): state(valid=49)}
    plan = plan_samples([("a", ["signature", "bench"])], states, {}, lim, NOW)
    assert plan == [PlanItem("a", "signature", 1)]
    states = {("a", "signature"): state(valid=50)}
    plan = plan_samples([("a", ["signature", "bench"])], states, {}, lim, NOW)
    assert plan == [PlanItem("a", "bench", 10)]


def test_a_prerequisite_the_node_is_not_measured_on_does_not_block() -> None:
    lim = limits(dependencies={"bench": ["signature"]})
    assert plan_samples([("a", ["bench"])], {}, {}, lim, NOW) == [PlanItem("a", "bench", 10)]


def test_node_budget_caps_docs_per_hour_and_resets() -> None:
    budgets = {"a": NodeBudget(window_start=NOW)}
    lim = limits(node_budget_per_hour=15)
    plan = plan_samples([("a", ["t1", "t2"])], {}, budgets, lim, NOW)
    assert plan == [PlanItem("a", "t1", 10), PlanItem("a", "t2", 5)]
    assert plan_samples([("a", ["t1", "t2"])], {}, budgets, lim, NOW + 10) == []
    assert sum(i.count for i in plan_samples([("a", ["t1", "t2"])], {}, budgets, lim,
                                             NOW + 3601)) == 15


def test_backoff_grows_exponentially_and_is_capped() -> None:
    assert backoff_s(2, after=3, base_s=30, max_s=1800) == 0
    assert backoff_s(3, after=3, base_s=30, max_s=1800) == 30
    assert backoff_s(4, after=3, base_s=30, max_s=1800) == 60
    assert backoff_s(20, after=3, base_s=30, max_s=1800) == 1800


def test_a_busy_node_is_topped_up_in_batches_of_refill_docs() -> None:
    """A node that still has docs gets more only once ``refill_docs`` can go at once: each
    dispatch costs the loop a draw, a relay stream and scoring calls, whether it carries one
    doc or eight (the README's development runs: 28 against 19-21 CPU-ms per doc). An idle
    node, or a pair that needs fewer than that to fill, is planned at once."""
    lim = limits(max_in_flight=24, refill_docs=8)
    states = {("a", "t"): state(in_flight=20),  # 4 free: waits
              ("b", "t"): state(in_flight=16),  # 8 free: goes
              ("c", "t"): state(valid=47, in_flight=1),  # needs 2 to fill: goes
              ("d", "t"): state(in_flight=20, answered=20),  # all answered, none at node
              ("e", "t"): state()}
    plan = plan_samples([(n, ["t"]) for n in "abcde"], states, {}, lim, NOW)
    assert plan == [PlanItem("b", "t", 8), PlanItem("c", "t", 2), PlanItem("d", "t", 24),
                    PlanItem("e", "t", 24)]
    # at most half the window: with 6 in flight the node waits for 3 free, not 8
    small = limits(max_in_flight=6, refill_docs=8)
    assert plan_samples([("a", ["t"])], {("a", "t"): state(in_flight=4)}, {}, small, NOW) == []
    assert plan_samples([("a", ["t"])], {("a", "t"): state(in_flight=3)}, {}, small, NOW) == [
        PlanItem("a", "t", 3)]
    # refill_docs=1: as soon as one can go
    assert plan_samples([("a", ["t"])], {("a", "t"): state(in_flight=23)}, {},
                        limits(max_in_flight=24), NOW) == [PlanItem("a", "t", 1)]
