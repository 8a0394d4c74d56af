"""`splitedge report learning` on fake run files: statistics, parity lines, plots, errors."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from splitedge.cli import main

RETURNS = {  # (encoder, seed) -> final-100 mean return
    ("miniconv", 0): 480.0,
    ("miniconv", 1): 500.0,
    ("miniconv", 2): 430.0,
    ("naturecnn", 0): 500.0,
    ("naturecnn", 1): 490.0,
    ("naturecnn", 2): 470.0,
}


def _costs(encoder: str) -> dict[str, int]:
    split = encoder == "miniconv"
    enc, head = (1_000_000, 20_000) if split else (3_000_000, 70_000)
    return {
        "encoder_params": 1484 if split else 207520,
        "encoder_flops": enc,
        "head_params": 8450,
        "head_flops": head,
        "full_flops": enc + head,
        "server_flops": head if split else enc + head,
        "features_dim": 64 if split else 512,
        "feature_bytes_per_step": 64 if split else 0,
        "raw_bytes_per_step": 6912,
    }


def _write_runs(root: Path) -> None:
    for (encoder, seed), final in RETURNS.items():
        run = root / f"cartpole-pixels-ppo-{encoder}-s{seed}"
        run.mkdir(parents=True)
        steps = list(range(100, 10_100, 100))
        result = {
            "config": {"task": "cartpole-pixels", "algo": "ppo", "encoder": encoder, "seed": seed},
            "command": f"splitedge train --encoder {encoder} --seed {seed}",
            "timesteps": 10_000,
            "train_seconds": 120.0,
            "final_100_mean_return": final,
            "final_100_episodes": 100,
            "episodes": 100,
            "deterministic_eval_mean_return": final + 1.0,
            "random_policy_mean_return": 22.0,
            "costs": _costs(encoder),
            "curve": {"steps": steps, "returns": [float(s) / 20 for s in steps]},
        }
        (run / "result.json").write_text(json.dumps(result))


def test_report_table_parity_and_plot(tmp_path: Path) -> None:
    _write_runs(tmp_path / "runs")
    out = tmp_path / "docs" / "learning.md"
    assert main(["report", "learning", "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"splitedge report learning --runs {tmp_path / 'runs'} --out {out}" in text
    for encoder in ("miniconv", "naturecnn"):
        vals = [v for (e, _), v in RETURNS.items() if e == encoder]
        mean, std = statistics.mean(vals), statistics.stdev(vals)
        assert f"| {encoder} | 3 | {mean:.1f} ± {std:.1f} |" in text
    gap = statistics.mean([480.0, 500.0, 430.0]) - statistics.mean([500.0, 490.0, 470.0])
    nat_std = statistics.stdev([500.0, 490.0, 470.0])
    verdict = (
        "within one Full-CNN standard deviation"
        if abs(gap) <= nat_std
        else "behind by more than one Full-CNN standard deviation"
    )
    share = (
        100
        * (statistics.mean([480.0, 500.0, 430.0]) - 22.0)
        / (statistics.mean([500.0, 490.0, 470.0]) - 22.0)
    )
    assert f"gap {gap:+.1f}, {verdict}; {share:.0f}% of" in text
    assert "Every cell has 3 or more seeds." in text
    assert f"ratio {20_000 / 1_020_000:.3f}" in text  # head vs the same policy run whole
    assert f"ratio {20_000 / 3_070_000:.4f}" in text  # head vs the Full-CNN policy run whole
    png = tmp_path / "docs" / "learning-cartpole-pixels.png"
    assert f"]({png.name})" in text
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_report_without_runs_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    code = main(
        ["report", "learning", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "x.md")]
    )
    assert code != 0
    assert "splitedge train" in capsys.readouterr().err
