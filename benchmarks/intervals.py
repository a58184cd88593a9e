"""Spread of medians over interleaved rounds, and the "within noise" rule (standard library only).

Each benchmark variant is timed in ``n`` interleaved rounds; a round gives one median per variant.
The interval of a median is the distribution-free order-statistic interval [x_(k), x_(n-k+1)]
with the largest k whose coverage is at least ``confidence`` (for n = 5 or 7 rounds that is the
range, 94% and 98% coverage; for n = 9, the second-lowest to the second-highest, 96%). An
overhead is taken per round against the reference timed in the same round (paired, so drift
between rounds cancels), and it is "within noise" when its interval includes 0.
"""

from __future__ import annotations

import math
import statistics

CONFIDENCE = 0.9


def coverage(n: int, k: int) -> float:
    """Probability that [x_(k), x_(n-k+1)] of n samples contains the true median (continuous case)."""
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n


def median_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(median, lo, hi)``: the median and an order-statistic interval for it. With too few values
    for ``confidence`` the interval is the range (its coverage is then lower)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci: no values")
    k = 1
    for j in range(n // 2, 0, -1):
        if coverage(n, j) >= confidence:
            k = j
            break
    return statistics.median(xs), xs[k - 1], xs[n - k]


def paired_overhead_pct(values, reference, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(median, lo, hi)`` of the per-round overhead in percent, ``100 * (v_r / ref_r - 1)``."""
    if len(values) != len(reference):
        raise ValueError("paired_overhead_pct: one value per round for both")
    return median_ci([100.0 * (v / r - 1.0) for v, r in zip(values, reference, strict=True)], confidence)


def within_noise(lo: float, hi: float) -> bool:
    return lo <= 0.0 <= hi


def overhead_text(pct: float, lo: float, hi: float) -> str:
    """What the overhead column says, e.g. ``+0.03% [-0.05, +0.11] within noise``."""
    text = f"{pct:+.2f}% [{lo:+.2f}, {hi:+.2f}]"
    return f"{text} within noise" if within_noise(lo, hi) else text
