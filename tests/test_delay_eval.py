"""models/delay_eval.py: a bundle under a link's delay in simulated ticks. With no delay it
must score what the bundle's full.onnx scores acting directly in its env (computed here
without any wrapper); with one, a plain bundle holds and the numbers repeat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge.envs import make_env
from models.delay_eval import evaluate_bundle, main
from tests.conftest import ROOT

PENDULUM = ROOT / "models" / "zoo" / "pendulum-sac"
LINKS = """
[instant]
up_kbit = 100000
down_kbit = 100000
delay_ms = 0

[slow]
up_kbit = 2000
down_kbit = 2000
delay_ms = 55
jitter_ms = 10
"""


@pytest.fixture(scope="module")
def links(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("links") / "links.toml"
    path.write_text(LINKS)
    return path


def direct_return(seed: int) -> float:
    """One episode of full.onnx acting on every observation at once: no wrapper, no delay."""
    sess = ort.InferenceSession(str(PENDULUM / "full.onnx"), providers=["CPUExecutionProvider"])
    env = make_env("pendulum-pixels")
    obs, _ = env.reset(seed=seed)
    done, total = False, 0.0
    while not done:
        action = sess.run(None, {"observation": obs[None]})[0][0]
        obs, reward, terminated, truncated, _ = env.step(action)
        total, done = total + float(reward), terminated or truncated
    return total


def test_no_delay_is_the_direct_return(links: Path) -> None:
    got = evaluate_bundle(PENDULUM, "instant", links, episodes=1, seed=7, extra_ms=0.0)
    assert got["delay_ticks_max"] == 0 and got["strategy"] == "hold"
    assert got["mean_return"] == pytest.approx(direct_return(7), rel=1e-9)


def test_a_delay_repeats(links: Path) -> None:
    first = evaluate_bundle(PENDULUM, "slow", links, episodes=1, seed=7)
    again = evaluate_bundle(PENDULUM, "slow", links, episodes=1, seed=7)
    # (110 + 2 * 10 + 10 off the link) ms / 50 ms = 2.8 -> 3 ticks, by hand
    assert first["delay_ticks_max"] == 3
    assert first["returns"] == again["returns"]
    assert np.isfinite(first["mean_return"])


def test_errors_are_one_line(links: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--bundle", str(PENDULUM), "--link", "nowhere", "--links-file", str(links)])
    out = capsys.readouterr().out.strip()
    assert code == 2 and out.count("\n") == 0 and "unknown link profile 'nowhere'" in out


def test_first_reply_at_holds_the_default_for_its_ticks() -> None:
    """delay_eval --ceiling's env: the default action (0 clipped into the bounds) for the
    first N ticks of each episode whatever it is given, then the given action: by hand."""
    import gymnasium

    from models.delay_eval import FirstReplyAt

    class Record(gymnasium.Env):  # type: ignore[type-arg]
        observation_space = gymnasium.spaces.Discrete(2)
        action_space = gymnasium.spaces.Box(0.5, 2.0, (1,))

        def __init__(self) -> None:
            self.applied: list[float] = []

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> Any:
            return 0, {}

        def step(self, action: Any) -> Any:
            self.applied.append(float(np.asarray(action).reshape(-1)[0]))
            return 0, 0.0, len(self.applied) % 4 == 0, False, {}

    inner = Record()
    env = FirstReplyAt(inner, 2)
    for _ in range(2):
        env.reset()
        for a in (1.0, 1.25, 1.5, 1.75):
            env.step(np.array([a], np.float32))
    assert inner.applied == [0.5, 0.5, 1.5, 1.75] * 2
