"""Pixel tasks: spaces, determinism, frame stacking, and frames/rewards against the true state."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from edge.envs import make_env, tasks
from edge.envs.pixel_reacher import LINKS

TASKS = ("cartpole-pixels", "cartpole-camera", "pendulum-pixels", "reacher-pixels")


def _bright_centroid(frame: np.ndarray, threshold: int) -> np.ndarray:
    ys, xs = np.nonzero(frame >= threshold)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])  # pixel centres


def test_registry_knows_the_tasks() -> None:
    assert set(TASKS) <= set(tasks())


@pytest.mark.parametrize("task", TASKS)
def test_observations_fit_the_space_and_repeat_with_the_seed(task: str) -> None:
    runs = []
    for _ in range(2):
        env = make_env(task, seed=3)
        obs, _ = env.reset(seed=3)
        seen = [obs]
        for _ in range(30):
            obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
            assert env.observation_space.contains(obs)
            seen.append(obs)
            if terminated or truncated:
                obs, _ = env.reset()
        runs.append(np.stack(seen))
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("task", ("cartpole-pixels", "pendulum-pixels"))
def test_frames_stack_oldest_first(task: str) -> None:
    env = make_env(task, seed=0)
    prev, _ = env.reset(seed=0)
    for _ in range(5):
        obs, *_ = env.step(env.action_space.sample())
        np.testing.assert_array_equal(obs[:-1], prev[1:])
        prev = obs


def test_pendulum_rewards_are_pendulum_v1s() -> None:
    pixel, state = make_env("pendulum-pixels"), gym.make("Pendulum-v1")
    pixel.reset(seed=5)
    state.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.uniform(-2, 2, 1).astype(np.float32)
        _, r_pix, *_ = pixel.step(a)
        _, r_state, *_ = state.step(a)
        assert r_pix == pytest.approx(float(r_state))


def test_pendulum_frame_shows_the_rod_angle() -> None:
    env = make_env("pendulum-pixels")
    env.reset(seed=1)
    for _ in range(10):
        obs, *_ = env.step(np.array([1.0], np.float32))
        theta = float(env.unwrapped.state[0])
        size = obs.shape[-1]
        centre = np.array([size / 2, size / 2])
        # the rod's bright pixels average to about its midpoint: 0.21 * size from the pivot
        expected = centre + 0.21 * size * np.array([np.sin(theta), -np.cos(theta)])
        assert np.linalg.norm(_bright_centroid(obs[-1], 200) - expected) < 1.5


@pytest.mark.parametrize(("task", "size"), [("cartpole-pixels", 48), ("cartpole-camera", 224)])
def test_cartpole_frame_follows_the_cart_and_the_pole(task: str, size: int) -> None:
    env = make_env(task)
    env.reset(seed=2)
    for _ in range(6):
        obs, *_ = env.step(1)
        x, _, theta, _ = (float(v) for v in env.unwrapped.state)
        assert obs.shape == (3, size, size)
        cx, cy = (x / 2.4 * 0.5 + 0.5) * size, 0.75 * size
        cart = obs[-1][int(cy)]  # the cart's row; the pole is drawn above it
        cols = np.nonzero(cart > 100)[0]
        assert abs(cols.mean() + 0.5 - cx) < 1.5
        # the pole's bright pixels above the cart average to its midpoint (half its length up)
        above = obs[-1].copy()
        above[int(cy - 0.04 * size) - 1 :] = 0
        mid = np.array([cx, cy]) + 0.25 * size * np.array([np.sin(theta), -np.cos(theta)])
        assert np.linalg.norm(_bright_centroid(above, 120) - mid) < 0.04 * size


def _fingertip(q1: float, q2: float) -> np.ndarray:
    return np.array(
        [
            LINKS[0] * np.cos(q1) + LINKS[1] * np.cos(q1 + q2),
            LINKS[0] * np.sin(q1) + LINKS[1] * np.sin(q1 + q2),
        ]
    )


def test_reacher_reward_is_minus_distance_over_reach_minus_control() -> None:
    env = make_env("reacher-pixels", seed=0)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    for _ in range(20):
        q_before = env.unwrapped.joints.copy()
        a = rng.uniform(-1, 1, 2)
        _, reward, terminated, _, info = env.step(a)
        q = q_before + 0.25 * a  # joint velocity control, 0.25 rad per step at full action
        dist = np.linalg.norm(_fingertip(*q) - env.unwrapped.target)
        assert info["distance"] == pytest.approx(dist)
        assert reward == pytest.approx(-dist / sum(LINKS) - 0.1 * np.mean(a * a))
        assert not terminated


def test_reacher_episode_is_50_steps_and_target_in_disc() -> None:
    env = make_env("reacher-pixels", seed=0)
    for seed in range(20):
        env.reset(seed=seed)
        assert np.linalg.norm(env.unwrapped.target) < 0.2
    steps, truncated = 0, False
    while not truncated:
        *_, truncated, _ = env.step(env.action_space.sample())
        steps += 1
    assert steps == 50


def test_reacher_frame_shows_target_where_it_is() -> None:
    env = make_env("reacher-pixels", seed=0)
    obs, _ = env.reset(seed=4)
    size = obs.shape[-1]
    scale = (size / 2) / (sum(LINKS) * 1.05)
    tx, ty = env.unwrapped.target
    expected = np.array([size / 2 + tx * scale, size / 2 - ty * scale])
    # the target is the only full-white shape (the arm is mid grey)
    assert np.linalg.norm(_bright_centroid(obs[0], 250) - expected) < 1.0
