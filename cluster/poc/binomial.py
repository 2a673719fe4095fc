"""The one-sided binomial test a validator applies to a node's mismatches.

H0: the node is honest, each sampled nonce mismatches independently with the honest rate
``p``. The p-value is P(X >= k) for X ~ Binomial(n, p). scipy's ``binomtest`` is used
when scipy is installed; otherwise the exact tail sum below (log-space terms, summed from
the largest), which agrees with scipy to floating-point precision.
"""

from __future__ import annotations

import math


def binomial_tail_exact(k: int, n: int, p: float) -> float:
    """P(X >= k), X ~ Binomial(n, p), summed exactly term by term in log space."""
    _check(k, n, p)
    if k <= 0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k): scipy's exact one-sided binomtest when available, else the exact sum."""
    _check(k, n, p)
    if k <= 0:
        return 1.0
    try:
        from scipy.stats import binomtest
    except ImportError:
        return binomial_tail_exact(k, n, p)
    return float(binomtest(k, n, p, alternative="greater").pvalue)


def _check(k: int, n: int, p: float) -> None:
    if n < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")


def flag_probability(n: int, mismatch_rate: float, honest_rate: float, p_threshold: float) -> float:
    """Chance that a node mismatching at ``mismatch_rate`` is flagged with an n-nonce sample.

    The smallest k with P(X >= k | honest_rate) < p_threshold is the critical count; the
    answer is P(Y >= k) for Y ~ Binomial(n, mismatch_rate).
    """
    k = critical_count(n, honest_rate, p_threshold)
    if k is None:
        return 0.0
    if mismatch_rate <= 0.0:
        return 1.0 if k == 0 else 0.0
    if mismatch_rate >= 1.0:
        return 1.0
    return binomial_tail_exact(k, n, mismatch_rate)


def critical_count(n: int, honest_rate: float, p_threshold: float) -> int | None:
    """The fewest mismatches in n that the test calls fraud (None: none can)."""
    for k in range(n + 1):
        if binomial_tail_exact(k, n, honest_rate) < p_threshold:
            return k
    return None
