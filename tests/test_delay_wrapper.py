"""DelayedActions against hand-computed action sequences; LinkDelay against its distribution."""

from __future__ import annotations

import math
from typing import Any

import gymnasium
import numpy as np
import pytest

from deploy.link.profiles import LinkProfile
from models.delay_wrapper import IN_FLIGHT_KEY, DelayedActions, LinkDelay


class Recorder(gymnasium.Env):  # type: ignore[type-arg]
    """Observation [tick, episode]; remembers every action the wrapper applied."""

    def __init__(self, action_space: gymnasium.Space, episode_len: int = 100,  # type: ignore[type-arg]
                 dict_obs: bool = False):  # fmt: skip
        self.action_space = action_space
        box = gymnasium.spaces.Box(0, 1000, (2,), np.float32)
        self.observation_space = gymnasium.spaces.Dict({"state": box}) if dict_obs else box
        self.episode_len, self.dict_obs = episode_len, dict_obs
        self.applied: list[Any] = []
        self.t = self.episode = 0

    def _obs(self) -> Any:
        obs = np.array([self.t, self.episode], np.float32)
        return {"state": obs} if self.dict_obs else obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        super().reset(seed=seed)
        if self.t:
            self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action: Any) -> Any:
        self.applied.append(action)
        self.t += 1
        return self._obs(), 1.0, self.t >= self.episode_len, False, {}


class Scripted:
    """Delays in ticks read from a list, one per step."""

    def __init__(self, delays: list[int], max_ticks: int):
        self.delays, self.max_ticks = list(delays), max_ticks

    def draw(self, rng: np.random.Generator) -> int:
        return self.delays.pop(0)


def test_newest_arrived_action_is_applied_held_and_overtaken_ones_dropped() -> None:
    chosen = [1, 2, 0, 2, 2, 0, 1, 2, 0, 1]
    delays = [1, 3, 2, 1, 0, 3, 0, 3, 2, 3]
    # by hand: arrivals at 1, 4, 4, 4, 4, 8, 6, 10, 10, 12. Tick 0 has nothing: default 0.
    # Tick 1 takes chosen[0]. Tick 4 gets ticks 1-4's actions: the newest, chosen[4] = 2.
    # Tick 6 takes chosen[6] = 1; tick 5's action arrives at 8, older than it: dropped.
    applied = [0, 1, 1, 1, 2, 2, 1, 1, 1, 1]
    ages = [None, 1, 2, 3, 0, 1, 0, 1, 2, 3]
    env = Recorder(gymnasium.spaces.Discrete(3))
    wrapped = DelayedActions(env, Scripted(delays, 3))
    wrapped.reset(seed=0)
    got_ages, got_delays = [], []
    for a in chosen:
        _, _, _, _, info = wrapped.step(a)
        got_ages.append(info["applied_action_age"])
        got_delays.append(info["action_delay_ticks"])
    assert env.applied == applied
    assert got_ages == ages
    assert got_delays == delays


def test_observation_carries_the_last_d_max_actions_one_hot_padded_with_the_default() -> None:
    env = Recorder(gymnasium.spaces.Discrete(3))
    wrapped = DelayedActions(env, Scripted([3] * 10, 3))
    assert wrapped.observation_space.shape == (2 + 3 * 3,)
    obs, _ = wrapped.reset(seed=0)
    one_hot = {0: [1, 0, 0], 1: [0, 1, 0], 2: [0, 0, 1]}
    assert obs.tolist() == [0, 0, *one_hot[0], *one_hot[0], *one_hot[0]]
    wrapped.step(1)
    obs, *_ = wrapped.step(2)
    assert obs.tolist() == [2, 0, *one_hot[0], *one_hot[1], *one_hot[2]]
    assert obs.dtype == np.float32 and wrapped.observation_space.contains(obs)


def test_new_episode_drops_actions_in_flight_and_starts_from_the_default() -> None:
    env = Recorder(gymnasium.spaces.Discrete(3), episode_len=2)
    wrapped = DelayedActions(env, Scripted([1, 1, 1, 1, 1], 1))
    wrapped.reset(seed=0)
    wrapped.step(2)  # tick 0: default; 2 arrives at tick 1
    *_, terminated, _, _ = wrapped.step(1)  # tick 1: 2; 1 would arrive at tick 2
    assert terminated
    obs, _ = wrapped.reset()
    assert obs.tolist() == [0, 1, 1, 0, 0]  # the in-flight feature is the default again
    wrapped.step(2)  # the old episode's 1 is gone: default
    wrapped.step(0)
    assert env.applied == [0, 2, 0, 2]


def test_box_actions_with_a_constant_link_delay_are_shifted_by_its_ticks() -> None:
    # 30 ms round trip at 50 Hz (20 ms ticks): ceil(1.5) = 2 ticks, no jitter
    profile = LinkProfile("test", up_kbit=1000, down_kbit=1000, delay_ms=15)
    delay = LinkDelay.from_profile(profile, period_s=0.02)
    assert delay.max_ticks == 2
    env = Recorder(gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32))
    wrapped = DelayedActions(env, delay, seed=0)
    wrapped.reset(seed=0)
    chosen = [np.array([0.1 * k, -0.1 * k], np.float32) for k in range(1, 6)]
    for a in chosen:
        obs, *_ = wrapped.step(a)
    expected = [np.zeros(2), np.zeros(2), *chosen[:3]]
    np.testing.assert_array_equal(np.stack(env.applied), np.stack(expected))
    np.testing.assert_array_equal(obs[2:], np.concatenate(chosen[3:]))  # the last 2 chosen


def test_dict_observations_gain_a_key_and_other_spaces_are_refused() -> None:
    env = Recorder(gymnasium.spaces.Box(-2.0, 2.0, (1,), np.float32), dict_obs=True)
    wrapped = DelayedActions(env, Scripted([0] * 3, 2))
    obs, _ = wrapped.reset(seed=0)
    assert set(obs) == {"state", IN_FLIGHT_KEY}
    assert obs[IN_FLIGHT_KEY].shape == (2, 1) and wrapped.observation_space.contains(obs)
    obs, *_ = wrapped.step(np.array([1.5], np.float32))
    assert obs[IN_FLIGHT_KEY].tolist() == [[0.0], [1.5]]
    assert env.applied[0].tolist() == [1.5]  # d = 0: applied at once
    tuple_env = Recorder(gymnasium.spaces.Discrete(2))
    tuple_env.observation_space = gymnasium.spaces.Tuple([gymnasium.spaces.Discrete(2)])
    with pytest.raises(ValueError, match="takes Box or Dict observations"):
        DelayedActions(tuple_env, Scripted([], 1))
    multi = Recorder(gymnasium.spaces.MultiBinary(2))
    with pytest.raises(ValueError, match="takes Discrete or Box actions, got MultiBinary"):
        DelayedActions(multi, Scripted([], 1))


def test_link_delay_with_jitter_matches_the_triangular_round_trip() -> None:
    # one-way 15 +- 5 ms each way: the round trip is triangular on [20, 40] ms. At 25 ms
    # ticks it is 1 tick when <= 25 ms: P = (25 - 20)^2 / (2 * 10 * 10) = 0.125; else 2.
    profile = LinkProfile("j", up_kbit=1000, down_kbit=1000, delay_ms=15, jitter_ms=5)
    delay = LinkDelay.from_profile(profile, period_s=0.025)
    assert delay.max_ticks == math.ceil(40 / 25)
    rng = np.random.default_rng(1)
    draws = np.array([delay.draw(rng) for _ in range(4000)])
    assert set(draws.tolist()) == {1, 2}
    assert abs(np.mean(draws == 1) - 0.125) < 0.03  # 6 standard errors
    # exactly k periods is k ticks (a float error must not make it k + 1)
    assert LinkDelay(period_s=0.02, rtt_ms=40).draw(rng) == 2
    assert LinkDelay(period_s=0.05, rtt_ms=0).max_ticks == 0
    with pytest.raises(ValueError, match="jitter_ms must be in"):
        LinkDelay(period_s=0.02, rtt_ms=10, jitter_ms=6)
