"""Encoders compared in the learning study, by name: the split MiniConv (float and es2
quantisation-aware) and the Full-CNN baseline (SB3's NatureCNN, run whole on the server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, NatureCNN

from models.encoders import MiniConv, MiniConvExtractor, build_ir

NATURE_MIN_SIDE = 36  # 8x8/4 -> 4x4/2 -> 3x3/1 leaves >= 1 pixel only from 36 pixels up


@dataclass(frozen=True)
class EncoderChoice:
    """How one named encoder is built for SB3, and whether it runs on the device (split)."""

    name: str
    extractor: type[BaseFeaturesExtractor]
    kwargs: dict[str, Any]
    split: bool  # features cross the wire as uint8 (MiniConv); else raw frames do (Full-CNN)
    es2_qat: bool = False


ENCODERS: dict[str, EncoderChoice] = {
    "miniconv": EncoderChoice("miniconv", MiniConvExtractor, {"arch": "miniconv"}, split=True),
    "miniconv-es2": EncoderChoice(
        "miniconv-es2", MiniConvExtractor, {"arch": "miniconv"}, split=True, es2_qat=True
    ),
    "miniconv-camera": EncoderChoice(
        "miniconv-camera", MiniConvExtractor, {"arch": "miniconv-camera"}, split=True
    ),
    "naturecnn": EncoderChoice("naturecnn", NatureCNN, {"features_dim": 512}, split=False),
}


# config.encoder of a head distilled from a model trained elsewhere (`splitedge train
# --distill-from MODEL.zip`): the student runs the teacher's own features extractor, whatever
# its class, on the device side of the split.
TEACHER_ENCODER = "teacher"


def is_split(encoder: str) -> bool:
    """Whether the encoder runs on the device (features cross the wire, not frames)."""
    return encoder == TEACHER_ENCODER or ENCODERS[encoder].split


def placeholder_act_quant(observation_space: gym.spaces.Box, arch: str = "miniconv") -> list[Any]:
    """Unit es2 scales for every stored stage; es2 calibration replaces them before training."""
    from edge.encoder.reference import ActQuant, stages

    c, h, w = observation_space.shape
    return [ActQuant(s.index, 1.0, 0) for s in stages(build_ir(arch, c, h, w))[:-1]]


def policy_kwargs(encoder: str, observation_space: gym.spaces.Box) -> dict[str, Any]:
    """features_extractor_class/kwargs for SB3; raises ValueError for an unknown or unfit encoder."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
    choice = ENCODERS[encoder]
    side = min(observation_space.shape[1:])
    if choice.extractor is NatureCNN and side < NATURE_MIN_SIDE:
        raise ValueError(
            f"naturecnn needs frames of at least {NATURE_MIN_SIDE} pixels, got {observation_space.shape}"
        )
    kwargs = dict(choice.kwargs)
    if choice.es2_qat:
        kwargs["act_quant"] = placeholder_act_quant(observation_space, kwargs["arch"])
    return {"features_extractor_class": choice.extractor, "features_extractor_kwargs": kwargs}


def miniconvs(module: Any) -> list[MiniConv]:
    """Every MiniConv inside a policy (online and target copies)."""
    return [m for m in module.modules() if isinstance(m, MiniConv)]


def feature_bytes(encoder: str, features_dim: int) -> int:
    """Bytes one step sends: uint8 features for a split encoder; 0 when raw frames are sent."""
    return features_dim if is_split(encoder) else 0


def raw_bytes(observation_shape: tuple[int, ...]) -> int:
    """Bytes of one uint8 observation (what raw offload sends per step)."""
    return int(np.prod(observation_shape))
