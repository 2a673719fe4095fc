from __future__ import annotations

import pytest

from cluster.core.errors import ConfigError
from cluster.core.settings import SlaSettings
from cluster.core.sla import SlaTimeout, fit_quadratic


def test_default_ttft_passes_through_the_seed_points() -> None:
    sla = SlaTimeout(SlaSettings())
    assert sla.ttft_s(0) == pytest.approx(0.0, abs=1e-9)
    assert sla.ttft_s(8192) == pytest.approx(2.0, rel=1e-9)
    assert sla.ttft_s(32768) == pytest.approx(10.0, rel=1e-9)


def test_ttft_is_quadratic_and_increasing_between_points() -> None:
    sla = SlaTimeout(SlaSettings())
    assert sla.a > 0  # convex: long prompts cost more than linearly
    values = [sla.ttft_s(n) for n in range(0, 40_000, 1000)]
    assert values == sorted(values)
    assert 0 < sla.ttft_s(4096) < 1.0


def test_timeout_adds_output_tokens_and_queue() -> None:
    settings = SlaSettings()
    sla = SlaTimeout(settings)
    expected = 2.0 + 0.336 * 100 + 30.0
    assert sla.timeout_s(8192, 100) == pytest.approx(expected, rel=1e-9)
    assert sla.timeout_s(0, 0) == pytest.approx(settings.queue_s)


def test_timeout_is_capped_at_max_timeout() -> None:
    sla = SlaTimeout(SlaSettings(max_timeout_s=60.0))
    assert sla.timeout_s(32768, 1000) == 60.0
    assert sla.timeout_s(10, 10) < 60.0


def test_negative_inputs_count_as_zero() -> None:
    sla = SlaTimeout(SlaSettings())
    assert sla.timeout_s(-5, -5) == sla.timeout_s(0, 0)


def test_custom_points_with_least_squares_fit() -> None:
    points = [(0, 1.0), (100, 2.0), (200, 5.0), (300, 10.0)]  # exactly 1e-4 x² + 1
    a, b, c = fit_quadratic(points)
    assert a == pytest.approx(1e-4, rel=1e-6)
    assert b == pytest.approx(0.0, abs=1e-9)
    assert c == pytest.approx(1.0, rel=1e-6)
    sla = SlaTimeout(
        SlaSettings(ttft_points=points, per_output_token_s=0.0, queue_s=0.0, max_timeout_s=1e9)
    )
    assert sla.timeout_s(400, 0) == pytest.approx(17.0, rel=1e-6)


def test_fewer_than_three_distinct_points_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="3 distinct"):
        SlaTimeout(SlaSettings(ttft_points=[(0, 0.0), (100, 1.0), (100, 2.0)]))
