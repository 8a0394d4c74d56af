"""Export of policies trained to hide link latency (models/realtime_training.py).

What changes against a plain export (models/export.py), all read from the model and the
`realtime` record that `splitedge train` keeps in result.json beside it:

- delay-aware: the model reads {"image", "actions_in_flight"}. The device part is the
  encoder on the image, as usual; head.onnx and full.onnx gain a second input,
  `actions_in_flight` (B, D, *action shape) in the action dtype, which the graph encodes
  as training did (one-hot for discrete actions) and appends to the features.
- chunk: the model's action is H actions flattened; head.onnx and full.onnx answer them
  as (B, H, *action shape), and the bundle's action spec is one tick's action.
- observations for calibration and the self-check come from rollouts in the env wrapped
  as in training (its delay and history included), so the head is proven on inputs like
  the ones it will see.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch
from torch import nn

from models.delay_wrapper import IN_FLIGHT_KEY
from models.encoders import MiniConvExtractor
from models.observations import CALIBRATION, CHECK, RANDOM_ACTION, Observations
from models.realtime_training import IMAGE_KEY, InFlightExtractor, wrap_env
from models.sb3_policy import Actor, _actor_parts, _split_extractor
from models.torch_ir import LayerError
from splitedge.errors import SplitedgeError
from splitedge.realtime_spec import RealtimeSpec

HISTORY_INPUT = "actions_in_flight"


def realtime_record(model: Any, result: dict[str, Any]) -> dict[str, Any] | None:
    """The training record of a latency-hiding model (None for a plain one); refuses a
    Dict-observation model that comes without it."""
    record = result.get("realtime")
    if isinstance(model.observation_space, gymnasium.spaces.Dict) and not record:
        raise SplitedgeError(
            "the model reads Dict observations (a MultiInputPolicy) but result.json beside it has "
            "no `realtime` record; export reads only image policies (CnnPolicy) and the Dict "
            "models that `splitedge train --delay-profile` makes"
        )
    return dict(record) if record else None


def spec_of(record: dict[str, Any] | None) -> RealtimeSpec:
    """The bundle's policy.realtime for a training record."""
    if record is None:
        return RealtimeSpec()
    source = "server" if record.get("history") == "server" else "device"
    return RealtimeSpec(
        int(record["chunk_length"]), int(record["action_history"]), float(record["control_hz"]),
        source,
    )  # fmt: skip


def read_delay_aware(model: Any, algo: str) -> Actor:
    """The Actor of a delay-aware model: its image encoder splits as usual; the head reads
    the actions in flight after the features (InFlightExtractor's order)."""
    from stable_baselines3.common.preprocessing import is_image_space

    policy = model.policy.eval()
    extractor, tail = _actor_parts(algo, policy)
    if not isinstance(extractor, InFlightExtractor):
        raise SplitedgeError(
            f"features extractor {type(extractor).__name__} is not the InFlightExtractor "
            "`splitedge train --delay-profile` builds; export cannot tell where its history goes"
        )
    image_space = model.observation_space[IMAGE_KEY]
    shape = tuple(int(d) for d in image_space.shape)
    scale = 1.0 / 255.0 if policy.normalize_images and is_image_space(image_space) else 1.0
    try:
        encoder, post = _split_extractor(extractor.image, shape, scale)
    except LayerError as e:
        raise SplitedgeError(str(e)) from e
    return Actor(
        algo=algo, model=model, extractor=extractor.image,
        extractor_name=f"{type(extractor).__name__}({type(extractor.image).__name__})",
        encoder=encoder.eval(), post=post.eval(), head=nn.Sequential(*tail).eval(),
        input_scale=scale, trained_quantised=isinstance(extractor.image, MiniConvExtractor),
    )  # fmt: skip


def tick_action_space(model: Any, spec: RealtimeSpec) -> Any:
    """One tick's action space: the model's, or one of its chunk's H actions."""
    space = model.action_space
    if spec.chunk_length == 1:
        return space
    low = np.asarray(space.low).reshape(spec.chunk_length, -1)[0]
    high = np.asarray(space.high).reshape(spec.chunk_length, -1)[0]
    return gymnasium.spaces.Box(low, high, dtype=space.dtype)


class HeadIO(nn.Module):
    """How head.onnx reads the actions in flight and shapes its answer (see module doc)."""

    def __init__(self, spec: RealtimeSpec, action_space: Any):
        super().__init__()
        self.history = spec.action_history
        self.chunk = spec.chunk_length
        self.n = int(action_space.n) if hasattr(action_space, "n") else None
        self.width = int(np.prod(action_space.shape)) if self.n is None else 1

    def encode_history(self, history: torch.Tensor) -> torch.Tensor:
        """(B, D, *action shape) -> (B, D * width) as training saw it (one-hot if discrete)."""
        if self.n is None:
            return history.to(torch.float32).flatten(1)
        idx = history.reshape(-1, self.history, 1)  # (B, D, 1) int64
        hot = idx == torch.arange(self.n, dtype=idx.dtype).reshape(1, 1, self.n)
        return hot.to(torch.float32).flatten(1)  # (B, D * n)

    def shape_output(self, actions: torch.Tensor) -> torch.Tensor:
        """(B, H * width) -> (B, H, width) for a chunk; unchanged otherwise."""
        if self.chunk == 1:
            return actions
        return actions.reshape(-1, self.chunk, self.width)


def example_history(spec: RealtimeSpec, action_space: Any) -> torch.Tensor | None:
    """A zero (1, D, *action shape) history in the action dtype, for tracing (None: D = 0)."""
    if not spec.action_history:
        return None
    if hasattr(action_space, "n"):
        return torch.zeros((1, spec.action_history, 1), dtype=torch.int64)
    return torch.zeros((1, spec.action_history, *action_space.shape), dtype=torch.float32)


def gather_realtime(
    model: Any, name: str, kwargs: dict[str, Any], record: dict[str, Any], action_space: Any
) -> tuple[Observations, dict[str, np.ndarray], Any]:
    """(calibration and check images, the check set's extra head inputs, the check set as
    the model reads it) from the model's rollouts in its env, wrapped as in training."""
    calibration, _ = _rollout(model, name, kwargs, record, CALIBRATION, seed=0)
    check_images, check_obs = _rollout(model, name, kwargs, record, CHECK, seed=1)
    extra: dict[str, np.ndarray] = {}
    if isinstance(check_obs, dict):
        flight = check_obs[IN_FLIGHT_KEY]  # (N, D, width) float32, one-hot if discrete
        if hasattr(action_space, "n"):
            extra[HISTORY_INPUT] = flight.argmax(axis=2).astype(np.int64)[..., None]
        else:
            extra[HISTORY_INPUT] = flight.reshape(len(flight), flight.shape[1], *action_space.shape)
    env = {"id": name, "kwargs": kwargs}
    data = Observations(calibration, check_images, f"env {name} ({record['strategy']})", env)
    return data, extra, check_obs


def _rollout(
    model: Any, name: str, kwargs: dict[str, Any], record: dict[str, Any], count: int, seed: int
) -> tuple[np.ndarray, Any]:
    from edge.envs import make_env

    space = model.observation_space
    image_space = space[IMAGE_KEY] if isinstance(space, gymnasium.spaces.Dict) else space
    raw = make_env(name, expect_shape=image_space.shape, **kwargs)
    env = wrap_env(raw, record, seed)
    if env.action_space != model.action_space or env.observation_space != space:
        raise SplitedgeError(
            f"env {name!r} wrapped as in training gives {env.observation_space} -> "
            f"{env.action_space}, the model reads {space} -> {model.action_space}; pass the "
            "env (and --env-kwargs) the model was trained on"
        )
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out: list[Any] = []
    while len(out) < count:
        out.append(obs)
        if rng.random() < RANDOM_ACTION:
            action = env.action_space.sample()
        else:
            action, _ = model.predict(obs, deterministic=False)
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset(seed=seed + 1000 + len(out))
    if isinstance(space, gymnasium.spaces.Dict):
        batch = {k: np.stack([o[k] for o in out]) for k in space.spaces}
        return batch[IMAGE_KEY].astype(np.uint8), batch
    images = np.stack(out).astype(np.uint8)
    return images, images
