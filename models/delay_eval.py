"""Evaluate any policy bundle under a link's delay, in simulated ticks, as the device would act.

The same rules as the device's real-time loop and as training under a delay: each action
(or chunk) arrives d ticks after its observation, d drawn per tick from the link's round
trip and jitter at the control rate (models/delay_wrapper.py's LinkDelay); a plain bundle's
newest arrived action is held ("hold"), a delay-aware bundle also reads the actions in
flight (those the server chose, or as the device knows them: the bundle's
history_source), and a chunking bundle's chunks are played by ChunkPlayer.
The policy is the bundle's full.onnx, run with onnxruntime, deterministic; no network and
no wall clock, so every strategy (and every seed of a study) is compared on equal terms
and the numbers repeat. `splitedge measure --loop realtime` is the same question over a
real (emulated) link.

    python -m models.delay_eval --bundle models/zoo/pendulum-sac --link 3g [--episodes 20]
    python -m models.delay_eval --bundle models/zoo/pendulum-sac --link sync   # no delay
    python -m models.delay_eval --bundle models/zoo/pendulum-sac --link 3g --ceiling
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np

from deploy.link.profiles import get_profile
from edge.envs import bundle_env, make_env
from edge.realtime import declared_rate_hz
from models.chunk_wrapper import ChunkedActions
from models.delay_wrapper import IN_FLIGHT_KEY, DelayedActions, LinkDelay, default_action
from models.realtime_training import DELAY_EXTRA_MS, IMAGE_KEY, ImageDict
from splitedge.bundle import load_bundle
from splitedge.errors import SplitedgeError
from splitedge.onnx import cpu_session
from splitedge.realtime_spec import realtime_spec

EVAL_SEED = 10_000  # as models/train.py's deterministic evaluation
SYNC = "sync"  # not a link: no delay at all, the turn-by-turn loop's return


def evaluate_bundle(
    bundle_path: str | Path,
    link: str,
    links_file: str | Path | None = None,
    episodes: int = 20,
    seed: int = EVAL_SEED,
    control_hz: float | None = None,
    extra_ms: float = DELAY_EXTRA_MS,
    ceiling: bool = False,
) -> dict[str, Any]:
    """Mean and per-episode returns of the bundle under `link`'s delay (see module doc).
    `ceiling`: a plain bundle turn by turn, but from the tick its first reply could arrive
    on the link (the default action before): what no strategy can beat there."""
    bundle = load_bundle(bundle_path)
    policy = bundle.policy
    spec = realtime_spec(policy, f"bundle {bundle_path}")
    name, kwargs = bundle_env(policy)
    hz = control_hz or spec.control_hz or declared_rate_hz(make_env(name, **kwargs))
    if hz is None:
        raise SplitedgeError(f"{name} declares no control rate; pass --control-hz")
    if link == SYNC:  # turn by turn: each action applies to the observation it answers
        delay, extra_ms = LinkDelay(1.0 / hz, 0.0), 0.0
    else:
        delay = LinkDelay.from_profile(get_profile(link, links_file), 1.0 / hz, extra_ms)
    if ceiling and (link == SYNC or spec.strategy != "hold"):
        raise SplitedgeError("--ceiling is for a plain bundle on a link (not sync)")
    if spec.action_history and spec.action_history != delay.max_ticks:
        raise SplitedgeError(
            f"the bundle reads {spec.action_history} actions in flight, link {link} at {hz:g} Hz "
            f"is {delay.max_ticks} ticks at most; evaluate it on the link it was trained for"
        )
    full = cpu_session(bundle.file(policy["full"]["onnx"]))
    discrete = policy["action"]["type"] == "discrete"
    returns = []
    for episode in range(episodes):
        env: Any = make_env(name, **kwargs)
        if ceiling:
            first = delay.draw(np.random.default_rng(seed + episode))
            env = FirstReplyAt(env, first)  # then turn by turn: no wrapper, no delay
        elif spec.chunk_length > 1:
            env = ChunkedActions(env, spec.chunk_length, delay, seed + episode)
        else:
            history = "chosen" if spec.server_history else "known"  # who supplies it
            env = DelayedActions(ImageDict(env), delay, seed + episode, history=history)
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            action = _act(full, obs, spec.action_history, discrete, policy["action"])
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return {
        "bundle": f"{bundle.name} {bundle.version}",
        "strategy": "ceiling" if ceiling else spec.describe(),
        "link": link,
        "control_hz": hz,
        "delay_ticks_max": delay.max_ticks,
        "extra_ms": extra_ms,
        "episodes": episodes,
        "mean_return": float(np.mean(returns)),
        "returns": returns,
    }


class FirstReplyAt(gymnasium.Wrapper):  # type: ignore[type-arg]
    """An env that applies the default action (zeros clipped into the bounds, or 0) for its
    first `ticks` ticks of each episode, whatever it is given: no reply has arrived yet."""

    def __init__(self, env: Any, ticks: int):
        super().__init__(env)
        self.ticks, self._tick = ticks, 0
        self.default = default_action(env.action_space)

    def reset(self, **kwargs: Any) -> Any:
        self._tick = 0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> Any:
        self._tick += 1
        return self.env.step(self.default if self._tick <= self.ticks else action)


def _act(full: Any, obs: Any, history: int, discrete: bool, action: dict[str, Any]) -> Any:
    """full.onnx's answer for one observation, as the env under its wrapper takes it."""
    image = obs[IMAGE_KEY] if isinstance(obs, dict) else obs
    feed = {"observation": np.asarray(image, np.uint8)[None]}
    if history:
        flight = obs[IN_FLIGHT_KEY]  # (D, width), one-hot for discrete actions
        if discrete:
            feed["actions_in_flight"] = flight.argmax(axis=1).astype(np.int64)[None, :, None]
        else:
            shape = [int(d) for d in action["shape"]]
            feed["actions_in_flight"] = flight.reshape(1, history, *shape).astype(np.float32)
    out = np.asarray(full.run(None, feed)[0])[0]
    if discrete:
        return int(out) if out.ndim == 0 else out  # a chunk stays an array
    return out.reshape(-1)  # one action, or a chunk flattened as the wrapper takes it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="policy bundle directory or .tar")
    p.add_argument(
        "--link",
        required=True,
        help="link profile (deploy/links.toml or --links-file), or `sync`: no delay, turn by turn",
    )
    p.add_argument("--links-file", default=None, help="TOML file of link profiles")
    p.add_argument("--episodes", type=int, default=20, help="episodes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="first episode's seed")
    p.add_argument("--control-hz", type=float, default=None, help="default: the bundle's/env's")
    p.add_argument(
        "--extra-ms", type=float, default=DELAY_EXTRA_MS, help="off-link ms per decision"
    )
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="a plain bundle turn by turn, but acting only from the tick its first reply "
        "could arrive on --link: the most any latency hiding can keep there",
    )
    args = p.parse_args(argv)
    try:
        result = evaluate_bundle(
            args.bundle, args.link, args.links_file, args.episodes, args.seed, args.control_hz,
            args.extra_ms, args.ceiling,
        )  # fmt: skip
    except SplitedgeError as e:
        print(f"delay_eval: error: {e}")
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
