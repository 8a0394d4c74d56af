"""Training for a slow link (issue 17): `splitedge train --delay-profile LINK` and `--chunk H`.

Two ways for the policy to hide the link's latency, chosen by the flags:

- delay-aware (`--delay-profile LINK`): the env's actions arrive d ticks late, d drawn per
  step from the link's round trip at the control rate (models/delay_wrapper.py), and the
  policy reads the last D = the link's longest delay in ticks actions next to its
  encoder's features: the ones it chose, as the server keeps them per stream
  (`history: "server"`, server/stream_history.py). With `--distill-from RUN` the head
  learns by imitating a plain policy instead of by RL (models/delay_distill.py).
  The observation becomes {"image": frame, "actions_in_flight": (D, width)}; the image
  goes through the usual encoder and the actions join its features before the head.
- chunk (`--chunk H`, H > 1): the policy answers with the next H actions
  (models/chunk_wrapper.py), played by the device's ChunkPlayer under the link's delay
  when `--delay-profile` is given too, else as open-loop macro-actions. Box actions only.

The control rate is the env's own (its `dt` or `tau`) or `--control-hz`. `resolve` checks
the flags together and returns the record (plain JSON) that result.json keeps and export
turns into the bundle's `policy.realtime`; `wrap_env` rebuilds the training env from it.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from models.baselines import is_split, policy_kwargs
from models.chunk_wrapper import ChunkedActions
from models.delay_wrapper import IN_FLIGHT_KEY, DelayedActions, LinkDelay

IMAGE_KEY = "image"
# Time a decision spends off the link (encoding, serialisation, the server's batch): a
# link's round trip alone undercounts it. Over the 3g proxy the zoo pendulum bundle's
# decisions took p50 305.5 / p95 324 ms against a 300 ms round trip, so 3g at 20 Hz is
# 7 ticks on the device, not 6; 10 ms covers the median here. --delay-extra-ms changes it.
DELAY_EXTRA_MS = 10.0
# Who supplies a delay-aware head's actions in flight (splitedge/realtime_spec.py's
# history_source): the server, from its own answers (server/stream_history.py). It knows
# the replies still on their way down, which the device cannot ("known", edge/history.py:
# at a constant delay of D ticks that list is the held action D times over). Runs
# recorded with history "known" still rebuild and export as device-history bundles.
HISTORY_MODE = "server"
WRAPPER_HISTORY = {"server": "chosen", "known": "known"}  # record -> DelayedActions mode


def resolve(
    task: str,
    encoder: str,
    discrete: bool,
    delay_profile: str | None,
    links_file: str | None,
    chunk: int,
    control_hz: float | None,
    extra_ms: float = DELAY_EXTRA_MS,
    env_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The latency-hiding record for these flags (None: plain training); ValueError or
    SplitedgeError (an unknown link or links file) with one line when they do not fit."""
    if chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {chunk}")
    if control_hz is not None and not control_hz > 0:
        raise ValueError(f"--control-hz must be > 0, got {control_hz}")
    if not extra_ms >= 0:
        raise ValueError(f"--delay-extra-ms must be >= 0, got {extra_ms}")
    if delay_profile is None and chunk == 1:
        if control_hz is not None or links_file is not None:
            raise ValueError("--control-hz and --links-file need --delay-profile or --chunk")
        return None
    if not is_split(encoder):
        raise ValueError(
            f"--delay-profile and --chunk are for split encoders; {encoder} runs on the server"
        )
    if chunk > 1 and discrete:
        raise ValueError(
            f"--chunk {chunk} needs continuous actions (sac or ddpg); {task} is discrete"
        )
    from edge.envs import make_env
    from edge.realtime import declared_rate_hz

    hz = control_hz or declared_rate_hz(make_env(task, **(env_kwargs or {})))
    if hz is None:
        raise ValueError(f"{task} declares no control rate (dt or tau); pass --control-hz")
    record: dict[str, Any] = {"control_hz": float(hz), "chunk_length": chunk, "action_history": 0}
    if delay_profile is not None:
        from deploy.link.profiles import get_profile

        profile = get_profile(delay_profile, links_file)
        delay = LinkDelay.from_profile(profile, 1.0 / hz, extra_ms)
        if delay.max_ticks == 0:
            raise ValueError(
                f"link {profile.name}'s round trip ({profile.rtt_ms:g} ms, +{extra_ms:g} ms off "
                f"the link) fits in one tick at "
                f"{hz:g} Hz: no delay to hide; train without --delay-profile"
            )
        if chunk > 1 and chunk <= delay.max_ticks:
            raise ValueError(
                f"--chunk {chunk} is not longer than link {profile.name}'s longest delay "
                f"({delay.max_ticks} ticks at {hz:g} Hz); use --chunk {delay.max_ticks + 1} or more"
            )
        record.update(
            link=profile.name, rtt_ms=delay.rtt_ms, jitter_ms=delay.jitter_ms,
            extra_ms=extra_ms, max_delay_ticks=delay.max_ticks,
        )  # fmt: skip
        if chunk == 1:
            record.update(action_history=delay.max_ticks, history=HISTORY_MODE)
    record["strategy"] = "chunk" if chunk > 1 else "delay-aware"
    record["chunk_play"] = ("device" if delay_profile else "macro") if chunk > 1 else None
    return record


def link_delay(record: dict[str, Any]) -> LinkDelay | None:
    """The record's delay model (None: no link delay in training)."""
    if "rtt_ms" not in record:
        return None
    return LinkDelay(
        1.0 / record["control_hz"], record["rtt_ms"], record["jitter_ms"],
        record.get("extra_ms", 0.0),
    )  # fmt: skip


class ImageDict(gymnasium.ObservationWrapper):  # type: ignore[type-arg]
    """An image env's observation as {"image": frame}, so the actions in flight can join it."""

    def __init__(self, env: gymnasium.Env):  # type: ignore[type-arg]
        super().__init__(env)
        self.observation_space = gymnasium.spaces.Dict({IMAGE_KEY: env.observation_space})

    def observation(self, observation: Any) -> Any:
        return {IMAGE_KEY: observation}


def wrap_env(env: Any, record: dict[str, Any] | None, seed: int | None = None) -> Any:
    """The env as training saw it under `record` (the env itself for plain training)."""
    if record is None:
        return env
    delay = link_delay(record)
    if record["chunk_length"] > 1:
        return ChunkedActions(env, record["chunk_length"], delay, seed)
    assert delay is not None  # resolve() gives a history only with a link
    return DelayedActions(ImageDict(env), delay, seed, history=WRAPPER_HISTORY[record["history"]])


class InFlightExtractor(BaseFeaturesExtractor):
    """The encoder on the "image" key, with the actions in flight appended to its features.

    :param observation_space: Dict with "image" (uint8 C, H, W) and "actions_in_flight"
    :param encoder: a split encoder's name (models/baselines.py ENCODERS)
    :param act_quant: es2 storage scales, passed on to the encoder (models/qat.py sets them)
    :param image_class: instead of a named encoder, this features extractor class on the
        image, with `image_kwargs` (a model trained elsewhere: `--distill-from MODEL.zip`)
    """

    def __init__(self, observation_space: gymnasium.spaces.Dict, encoder: str = "miniconv",
                 act_quant: Any = None, image_class: type | None = None,
                 image_kwargs: dict[str, Any] | None = None):  # fmt: skip
        image, flight = observation_space[IMAGE_KEY], observation_space[IN_FLIGHT_KEY]
        if image_class is not None:
            inner = {"features_extractor_class": image_class,
                     "features_extractor_kwargs": image_kwargs or {}}  # fmt: skip
        else:
            inner = policy_kwargs(encoder, image)
        kwargs = dict(inner["features_extractor_kwargs"])
        if act_quant is not None:
            kwargs["act_quant"] = act_quant
        extractor = inner["features_extractor_class"](image, **kwargs)
        self.history_dim = int(np.prod(flight.shape))
        super().__init__(observation_space, extractor.features_dim + self.history_dim)
        self.image = extractor

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self.image(observations[IMAGE_KEY])  # (B, F)
        return torch.cat([features, observations[IN_FLIGHT_KEY].flatten(1)], dim=1)


def extractor_kwargs(encoder: str, observation_space: Any) -> dict[str, Any]:
    """SB3 policy_kwargs for the (possibly Dict) observation space training uses."""
    if isinstance(observation_space, gymnasium.spaces.Dict):
        return {
            "features_extractor_class": InFlightExtractor,
            "features_extractor_kwargs": {"encoder": encoder},
        }
    return policy_kwargs(encoder, observation_space)
