"""Interquartile mean (IQM) across seeds, with a 95% stratified-bootstrap confidence interval.

The field's standard since Agarwal et al., "Deep RL at the edge of the statistical
precipice" (NeurIPS 2021): a mean over a handful of seeds is dragged by one lucky or
unlucky run, a median throws most runs away; the IQM (mean of the middle 50% of runs) is
robust to both, and the bootstrap interval says how much a few seeds can tell. We use the
authors' own library, rliable, rather than re-deriving its estimators.

`rliable` is an offline (report-time) dependency: nothing on the device imports this.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

REPS = 2000  # bootstrap resamples: the interval's ends settle to ~1% of its width by here
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """IQM of `n` runs and its 95% bootstrap interval [lo, hi]."""

    iqm: float
    lo: float
    hi: float
    n: int

    def text(self, digits: int = 1) -> str:
        """'-130.2 [-141.0, -125.5]' as the reports print it."""
        return f"{self.iqm:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def iqm_interval(scores: Sequence[float], seed: int = 0, reps: int = REPS) -> Interval:
    """IQM of one cell's per-seed scores (one task: the stratified bootstrap resamples seeds).

    One seed gives a zero-width interval at its own value: said, not hidden, by `n`.
    """
    from rliable import library as rly
    from rliable import metrics

    a = np.asarray(scores, dtype=float).reshape(-1, 1)  # (runs, tasks)
    if a.size == 0:
        raise ValueError("no scores to summarise")
    if not np.isfinite(a).all():
        raise ValueError(f"scores must be finite numbers, got {a.ravel().tolist()}")
    if a.shape[0] == 1:
        v = float(a[0, 0])
        return Interval(v, v, v, 1)
    # rliable seeds its bootstrap with random_state, but part of the resampling still draws
    # from numpy's global generator: seed that too, and put it back, so a report repeats
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():  # rliable hands arch a RandomState, arch deprecates it
            warnings.simplefilter("ignore", FutureWarning)
            point, ci = rly.get_interval_estimates(
                {"cell": a},
                lambda x: np.array([metrics.aggregate_iqm(x)]),
                reps=reps,
                confidence_interval_size=CONFIDENCE,
                random_state=np.random.RandomState(seed),
            )
    finally:
        np.random.set_state(saved)
    return Interval(
        float(point["cell"][0]), float(ci["cell"][0, 0]), float(ci["cell"][1, 0]), len(a)
    )


def normalised(score: float, random: float, reference: float) -> float:
    """Score on a 0 (random policy) .. 1 (reference, e.g. the sync loop) scale."""
    if reference == random:
        raise ValueError("the reference and random scores are equal: nothing to normalise by")
    return (score - random) / (reference - random)
