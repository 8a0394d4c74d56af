"""A user's SB3 model as the parts a split deployment needs, read from the model itself.

`read_actor` finds the deterministic actor of a PPO / A2C / SAC / TD3 / DDPG model built
from SB3's own policy classes (or ours), the features extractor it runs, and splits it:
the leading conv stack goes to the device (as IR), everything after it (a Linear like
NatureCNN's, the actor MLP, the action transform of `predict`) goes to the server head.
Nothing is assumed about the task: shapes, scales and action bounds come from the model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.encoders import MiniConv, MiniConvExtractor
from models.torch_ir import LayerError, build_ir, flatten_modules, read_conv_stack
from splitedge.errors import SplitedgeError

ALGORITHMS = ("ppo", "a2c", "sac", "td3", "ddpg")
DISCRETE = "discrete"


@dataclass
class Actor:
    """The deployable actor of an SB3 model.

    `encoder` is the device part as an IR module (its IR's output quantisation is not yet
    set unless `trained_quantised`); `post` maps flattened encoder features (B, F) to the
    extractor's output; `head` maps that to what `predict(deterministic=True)` returns.
    """

    algo: str
    model: Any
    extractor: nn.Module
    extractor_name: str
    encoder: MiniConv
    post: nn.Module
    head: nn.Module
    input_scale: float
    trained_quantised: bool  # a MiniConvExtractor: features were uint8 in training


def algorithm_of(model_zip: Path, data: dict[str, Any]) -> str:
    """The algorithm that saved a model.zip: result.json beside it, else its saved settings."""
    result_path = model_zip.parent / "result.json"
    if result_path.exists():
        algo = json.loads(result_path.read_text()).get("config", {}).get("algo")
        if algo in ALGORITHMS:
            return str(algo)
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.sac.policies import SACPolicy
    from stable_baselines3.td3.policies import TD3Policy

    cls = data.get("policy_class")
    if isinstance(cls, type) and issubclass(cls, ActorCriticPolicy):
        return "ppo" if "clip_range" in data else "a2c"
    if isinstance(cls, type) and issubclass(cls, SACPolicy):
        return "sac"
    if isinstance(cls, type) and issubclass(cls, TD3Policy):
        ddpg = data.get("policy_delay") == 1 and data.get("target_noise_clip") == 0.0
        return "ddpg" if ddpg else "td3"
    name = getattr(cls, "__name__", repr(cls))
    raise SplitedgeError(
        f"{model_zip}: policy class {name} is not one export supports; export reads "
        f"{', '.join(a.upper() for a in ALGORITHMS)} models (pass --algo if it is one of them)"
    )


def load_model(model_zip: Path, algo: str | None = None) -> tuple[Any, str]:
    """(the SB3 model on the CPU, its algorithm); user classes import from the working dir."""
    import stable_baselines3
    from stable_baselines3.common.save_util import load_from_zip_file

    import models.algos  # noqa: F401  (our off-policy policy classes a zip may refer to)

    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(
            0, ""
        )  # a user's extractor class lives in their own module, as with python -m
    try:
        data, _, _ = load_from_zip_file(model_zip, device="cpu", load_data=True)
    except ModuleNotFoundError as e:
        raise SplitedgeError(_missing_module(model_zip, e)) from e
    except Exception as e:  # SB3 raises several types for a file that is not its zip
        raise SplitedgeError(
            f"{model_zip} is not an SB3 model.zip ({type(e).__name__}: {e})"
        ) from e
    algo = algo or algorithm_of(model_zip, data or {})
    if algo not in ALGORITHMS:
        raise SplitedgeError(f"--algo {algo!r}: supported {', '.join(ALGORITHMS)}")
    try:
        model = getattr(stable_baselines3, algo.upper()).load(model_zip, device="cpu")
    except ModuleNotFoundError as e:
        raise SplitedgeError(_missing_module(model_zip, e)) from e
    except Exception as e:  # a broken or foreign zip fails in many ways inside SB3
        raise SplitedgeError(
            f"cannot load {model_zip} as an SB3 {algo.upper()} model ({type(e).__name__}: {e})"
        ) from e
    return model, algo


def _missing_module(model_zip: Path, e: ModuleNotFoundError) -> str:
    return (
        f"{model_zip} refers to module {e.name!r} (a custom features extractor?), which is not "
        "importable here; run export from the folder that holds it or add it to PYTHONPATH"
    )


def _image_scale(policy: Any) -> float:
    """SB3's preprocess_obs for a Box: /255 for an image space with normalize_images, else 1."""
    from stable_baselines3.common.preprocessing import is_image_space

    space = policy.observation_space
    return 1.0 / 255.0 if policy.normalize_images and is_image_space(space) else 1.0


class _Unscale(nn.Module):
    """[-1, 1] -> [low, high], as BasePolicy.unscale_action."""

    def __init__(self, space: Any):
        super().__init__()
        self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32).reshape(-1))
        self.register_buffer("high", torch.as_tensor(space.high, dtype=torch.float32).reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low + 0.5 * (x + 1.0) * (self.high - self.low)


class _Clip(_Unscale):
    """clip to [low, high], as predict does for an unsquashed Box action."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x, self.high), self.low)


class Argmax(nn.Module):
    """logits -> the action index, as predict(deterministic=True) for a Discrete space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argmax(x, dim=1)


def _actor_parts(algo: str, policy: Any) -> tuple[nn.Module, list[nn.Module]]:
    """(features extractor, the modules from its output to predict's action)."""
    from gymnasium import spaces

    space = policy.action_space
    if not isinstance(space, spaces.Discrete | spaces.Box):
        raise SplitedgeError(
            f"action space {type(space).__name__} is not supported; export reads Discrete and Box"
        )
    if algo in ("ppo", "a2c"):
        extractor = (
            policy.features_extractor
            if policy.share_features_extractor
            else policy.pi_features_extractor
        )
        tail: list[nn.Module] = [policy.mlp_extractor.policy_net, policy.action_net]
        if isinstance(space, spaces.Discrete):
            return extractor, [*tail, Argmax()]
        if policy.squash_output:
            return extractor, [*tail, nn.Tanh(), _Unscale(space)]
        return extractor, [*tail, _Clip(space)]
    actor = policy.actor
    extractor = actor.features_extractor
    extractor = getattr(extractor, "encoder", extractor)  # our DetachedFeatures wrapper
    if algo == "sac":
        return extractor, [actor.latent_pi, actor.mu, nn.Tanh(), _Unscale(space)]
    return extractor, [actor.mu, _Unscale(space)]  # TD3/DDPG: tanh is inside mu


def conv_sequences(extractor: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the extractor's children that are an nn.Sequential or ModuleList
    holding Conv2d layers: the candidates for the device part (export needs exactly one)."""
    return [
        (attr, mod)
        for attr, mod in extractor.named_children()
        if isinstance(mod, nn.Sequential | nn.ModuleList)
        and any(isinstance(m, nn.Conv2d) for m in flatten_modules(mod))
    ]


def _split_extractor(
    extractor: nn.Module, shape: tuple[int, ...], scale: float
) -> tuple[MiniConv, nn.Module]:
    """(the device conv stack as an IR module, the rest of the extractor)."""
    name = type(extractor).__name__
    if isinstance(extractor, MiniConvExtractor):
        return extractor.encoder, nn.Identity()
    seqs = conv_sequences(extractor)
    if not seqs:
        conv = any(isinstance(m, nn.Conv2d) for m in extractor.modules())
        why = (
            "keeps its Conv2d layers outside an nn.Sequential / ModuleList"
            if conv
            else "has no Conv2d (an MlpPolicy has nothing to run on the device)"
        )
        raise SplitedgeError(
            f"features extractor {name} {why}; export needs the CNN as one nn.Sequential of "
            "Conv2d / ReLU / MaxPool2d / AvgPool2d / Flatten"
        )
    if len(seqs) > 1:
        raise SplitedgeError(
            f"features extractor {name} has several conv sequences ({', '.join(a for a, _ in seqs)}); "
            "export needs one"
        )
    attr, cnn = seqs[0]
    stack = read_conv_stack(flatten_modules(cnn), f"{name}.{attr}")
    others = [m for a, m in extractor.named_children() if a != attr]
    ir = build_ir(stack, shape, scale)
    encoder = MiniConv.from_weights(ir, stack.weights)
    return encoder, nn.Sequential(*stack.rest, *others)


def read_actor(model: Any, algo: str) -> Actor:
    """Split the model's deterministic actor into device encoder, post and head."""
    policy = model.policy.eval()
    space = model.observation_space
    shape = tuple(int(d) for d in (getattr(space, "shape", None) or ()))
    if type(space).__name__ != "Box" or len(shape) != 3:
        raise SplitedgeError(
            f"observations are {type(space).__name__} {shape or ''}, not a (C, H, W) image; export "
            "needs an image policy (CnnPolicy; MultiInputPolicy / Dict observations are not "
            "supported)"
        )
    extractor, tail = _actor_parts(algo, policy)
    scale = _image_scale(policy)
    try:
        encoder, post = _split_extractor(extractor, shape, scale)
    except LayerError as e:
        raise SplitedgeError(str(e)) from e
    return Actor(
        algo=algo,
        model=model,
        extractor=extractor,
        extractor_name=type(extractor).__name__,
        encoder=encoder.eval(),
        post=post.eval(),
        head=nn.Sequential(*tail).eval(),
        input_scale=scale,
        trained_quantised=isinstance(extractor, MiniConvExtractor),
    )


def check_split(actor: Actor, observations: np.ndarray) -> float:
    """max |extractor(obs) - post(encoder(obs))|: 0 up to float rounding when the cut is exact."""
    with torch.no_grad():
        x = torch.as_tensor(observations).float() * actor.input_scale
        want = actor.extractor(x)
        f = actor.encoder(x) if actor.trained_quantised else actor.encoder.net(x).flatten(1)
        got = actor.post(f)
    return float((want - got).abs().max())


def predict(model: Any, observations: np.ndarray) -> np.ndarray:
    """SB3's deterministic actions for a batch of uint8 observations."""
    actions, _ = model.predict(observations, deterministic=True)
    return np.asarray(actions)
