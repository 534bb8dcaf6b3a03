"""The statistics of a sweep report: mean and sample standard deviation over seeds, and the
mean of paired differences with a two-sided Student t interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t distribution with ``df`` degrees of freedom."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    return float(stats.t.ppf(p, df))


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof=1; None for one value) of n values."""

    n: int = 0
    mean: float | None = None
    std: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            return cls()
        return cls(len(values), statistics.fmean(values),
                   statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class PairedCI:
    """Mean of paired differences with a two-sided t interval (None below two pairs)."""

    n: int = 0
    mean: float | None = None
    std: float | None = None
    low: float | None = None
    high: float | None = None
    level: float = 0.95

    @classmethod
    def of(cls, diffs: Sequence[float], level: float = 0.95) -> PairedCI:
        s = Stat.of(diffs)
        if s.n < 2 or s.std is None or s.mean is None:
            return cls(s.n, s.mean, s.std, level=level)
        half = t_quantile(0.5 + level / 2.0, s.n - 1) * s.std / math.sqrt(s.n)
        return cls(s.n, s.mean, s.std, s.mean - half, s.mean + half, level)
