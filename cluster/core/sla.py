"""SLA timeouts for node requests.

``timeout = TTFT(prompt tokens) + per_output_token_s * max_output_tokens + queue_s``,
capped at ``max_timeout_s``. TTFT is a quadratic in the prompt length, fitted (least
squares; exact through three points) to ``settings.ttft_points``: by default
0 → 0 s, 8192 → 2 s, 32768 → 10 s.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.core.errors import ConfigError
from cluster.core.settings import SlaSettings


def fit_quadratic(points: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """Least-squares ``(a, b, c)`` of ``y = a x² + b x + c`` (exact for three points)."""
    xs = sorted({float(x) for x, _ in points})
    if len(xs) < 3:
        raise ConfigError(
            f"sla.ttft_points: a quadratic fit needs 3 distinct prompt lengths, got {len(xs)}"
        )
    # Scale x to ~[0, 1] so the normal equations stay well conditioned.
    scale = max(abs(x) for x in xs) or 1.0
    sums = [0.0] * 5  # Σ u^0 .. Σ u^4
    rhs = [0.0] * 3  # Σ y u^0 .. Σ y u^2
    for x, y in points:
        u = float(x) / scale
        p = 1.0
        for k in range(5):
            sums[k] += p
            if k < 3:
                rhs[k] += float(y) * p
            p *= u
    # Normal equations for coefficients (c, b', a') of c + b' u + a' u².
    m = [[sums[i + j] for j in range(3)] + [rhs[i]] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-15:
            raise ConfigError("sla.ttft_points: degenerate points, cannot fit a quadratic")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(3):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [m[r][j] - f * m[col][j] for j in range(4)]
    c, b_u, a_u = (m[i][3] / m[i][i] for i in range(3))
    return a_u / (scale * scale), b_u / scale, c


class SlaTimeout:
    """Per-request timeouts from prompt length and requested output length."""

    def __init__(self, settings: SlaSettings) -> None:
        self.settings = settings
        self.a, self.b, self.c = fit_quadratic(settings.ttft_points)

    def ttft_s(self, prompt_tokens: int) -> float:
        """Allowed time to first token for a prompt of ``prompt_tokens`` (never negative)."""
        x = float(max(prompt_tokens, 0))
        return max(0.0, (self.a * x + self.b) * x + self.c)

    def timeout_s(self, prompt_tokens: int, max_output_tokens: int) -> float:
        s = self.settings
        total = (
            self.ttft_s(prompt_tokens)
            + s.per_output_token_s * max(max_output_tokens, 0)
            + s.queue_s
        )
        return min(total, s.max_timeout_s)
