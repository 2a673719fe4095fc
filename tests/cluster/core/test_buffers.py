import pytest

from cluster.core.buffers import percentile, summarize_buffer
from cluster.core.errors import ErrorCode


def row(code: ErrorCode, acc: float | None = None, lat: float | None = 0.1) -> dict:
    return {"error_code": int(code), "metrics": {} if acc is None else {"acc": acc},
            "latency_s": lat}


def test_failures_count_in_error_rate_and_score_zero() -> None:
    rows = [row(ErrorCode.OK, 1.0), row(ErrorCode.OK, 1.0), row(ErrorCode.NODE),
            row(ErrorCode.EVALUATION)]
    s = summarize_buffer("n", "t", rows, ["acc"], now=1.0)
    assert s.n == 4 and s.n_ok == 2
    assert s.error_rate == 0.5
    assert s.metrics["acc"].mean == 0.5
    assert s.errors_by_code == {"node": 1, "evaluation": 1}


def test_bench_side_failures_are_not_blamed_on_the_node() -> None:
    rows = [row(ErrorCode.OK, 1.0), row(ErrorCode.RELAY), row(ErrorCode.DATABASE_READ)]
    s = summarize_buffer("n", "t", rows, ["acc"], now=1.0)
    assert s.n == 1 and s.error_rate == 0.0 and s.metrics["acc"].mean == 1.0


def test_stderr_is_the_analytic_standard_error_of_the_mean() -> None:
    rows = [row(ErrorCode.OK, v) for v in (1.0, 0.0, 1.0, 1.0)]
    s = summarize_buffer("n", "t", rows, ["acc"], now=1.0)
    assert s.metrics["acc"].mean == 0.75
    assert s.metrics["acc"].stderr == pytest.approx((0.25 / 4) ** 0.5)


def test_latency_percentiles_use_ok_samples() -> None:
    rows = [row(ErrorCode.OK, 1.0, lat=float(i)) for i in range(1, 101)]
    s = summarize_buffer("n", "t", rows, ["acc"], now=1.0)
    assert s.latency_p50_s == 50 and s.latency_p95_s == 95
    assert percentile([], 50) is None
