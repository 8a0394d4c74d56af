"""IQM and its bootstrap interval (deploy/iqm.py, through rliable) against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.iqm import iqm_interval, normalised


def _hand_iqm(x: np.ndarray) -> float:
    """Mean of the middle half of the sorted scores (n a multiple of 4: no partial weights)."""
    s = np.sort(x)
    q = len(s) // 4
    return float(s[q : len(s) - q].mean())


def test_iqm_is_the_mean_of_the_middle_half() -> None:
    scores = [-900.0, -140.0, -131.0, -128.0, -127.0, -125.0, -124.0, -20.0]
    got = iqm_interval(scores)
    assert got.iqm == pytest.approx(_hand_iqm(np.array(scores)))  # (-131-128-127-125)/4
    assert got.iqm == pytest.approx(-127.75)
    assert got.lo <= got.iqm <= got.hi and got.n == 8


def test_interval_matches_a_hand_percentile_bootstrap() -> None:
    rng = np.random.default_rng(5)
    scores = rng.normal(-150.0, 30.0, size=12)
    got = iqm_interval(scores, reps=4000)
    # an independent bootstrap: resample the seeds with replacement, IQM by hand-ish
    # (scipy's trim_mean cuts whole scores, as rliable's IQM does), 2.5th/97.5th percentiles
    from scipy.stats import trim_mean

    boot = np.array([trim_mean(rng.choice(scores, size=len(scores)), 0.25) for _ in range(4000)])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    width = hi - lo
    assert abs(got.lo - lo) < 0.1 * width and abs(got.hi - hi) < 0.1 * width, (got, lo, hi)
    # more seeds of the same spread give a narrower interval
    wide = iqm_interval(scores[:5])
    assert wide.hi - wide.lo > got.hi - got.lo


def test_one_seed_is_a_point_and_bad_scores_are_refused() -> None:
    one = iqm_interval([-130.0])
    assert (one.iqm, one.lo, one.hi, one.n) == (-130.0, -130.0, -130.0, 1)
    assert one.text() == "-130.0 [-130.0, -130.0]"
    with pytest.raises(ValueError, match="finite"):
        iqm_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="no scores"):
        iqm_interval([])


def test_normalised_between_random_and_reference() -> None:
    assert normalised(-1226.0, random=-1226.0, reference=-128.0) == 0.0
    assert normalised(-128.0, random=-1226.0, reference=-128.0) == 1.0
    assert normalised(-677.0, random=-1226.0, reference=-128.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        normalised(1.0, random=2.0, reference=2.0)


def test_learning_report_rows_carry_the_iqm_interval() -> None:
    from models.learning_report import cell_summary, results_table

    finals = [120.0, 197.0, 210.0, 79.0, 400.0]
    runs = [
        {
            "config": {"seed": i, "task": "cartpole-pixels", "algo": "ppo", "encoder": "miniconv"},
            "final_100_mean_return": f,
            "deterministic_eval_mean_return": f + 10,
            "random_policy_mean_return": 22.0,
            "timesteps": 200_000,
            "final_100_episodes": 100,
            "train_seconds": 60.0,
            "costs": {
                "encoder_flops": 10_000,
                "server_flops": 20_000,
                "encoder_params": 900,
                "feature_bytes_per_step": 60,
                "raw_bytes_per_step": 6912,
            },
        }
        for i, f in enumerate(finals)
    ]
    s = cell_summary(runs)
    # 5 seeds: trim_mean cuts one score off each end -> mean(120, 197, 210)
    assert s["final_iqm"].iqm == pytest.approx((120 + 197 + 210) / 3)
    row = results_table({("cartpole-pixels", "ppo", "miniconv"): s})[-1]
    assert s["final_iqm"].text() in row and s["eval_iqm"].text() in row
