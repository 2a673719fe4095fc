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


def binomial_pmf(k: int, n: int, p: float) -> float:
    """P(X = k), X ~ Binomial(n, p); p may be 0 or 1."""
    if not 0 <= k <= n:
        return 0.0
    if p <= 0.0:
        return 1.0 if k == 0 else 0.0
    if p >= 1.0:
        return 1.0 if k == n else 0.0
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * math.log(p) + (n - k) * math.log1p(-p))


def upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k), X ~ Binomial(n, p), for any p in [0, 1] (exact)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return binomial_tail_exact(k, n, p)


def sequential_conviction_probability(
    n1: int, n2: int, escalate_at: int, mismatch_rate: float, honest_rate: float,
    p_threshold: float,
) -> float:
    """Chance that a node mismatching at ``mismatch_rate`` is convicted by the two-stage test.

    Stage 1: ``n1`` nonces, ``X1`` mismatches; fraud when P(Binomial(n1, honest) >= X1) is
    below ``p_threshold``. Otherwise, when ``X1 >= escalate_at`` (and ``n2 > 0``), ``n2``
    more are drawn; fraud when P(Binomial(n1 + n2, honest) >= X1 + X2) is below it. Exact:
    a sum over ``X1`` of its probability times the chance of conviction given it.
    """
    k1 = critical_count(n1, honest_rate, p_threshold)
    k_total = critical_count(n1 + n2, honest_rate, p_threshold) if n2 > 0 else None
    total = 0.0
    for x1 in range(n1 + 1):
        pmf = binomial_pmf(x1, n1, mismatch_rate)
        if pmf == 0.0:
            continue
        if k1 is not None and x1 >= k1:
            total += pmf
        elif k_total is not None and x1 >= escalate_at:
            total += pmf * upper_tail(k_total - x1, n2, mismatch_rate)
    return min(1.0, total)


def sequential_expected_checks(n1: int, n2: int, escalate_at: int, mismatch_rate: float,
                               honest_rate: float, p_threshold: float) -> float:
    """Expected nonces recomputed by the two-stage test for a node at ``mismatch_rate``."""
    k1 = critical_count(n1, honest_rate, p_threshold)
    stop_at = n1 + 1 if k1 is None else k1
    escalate = sum(binomial_pmf(x, n1, mismatch_rate) for x in range(escalate_at, stop_at))
    return n1 + (n2 * escalate if n2 > 0 else 0.0)
