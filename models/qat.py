"""es2 quantisation-aware training: keep each MiniConv's 8-bit storage scales calibrated.

MiniConv's es2 mode fake-quantises every stored stage with fixed scales, but the right
scales depend on the weights being learned. So training recalibrates them from the
current weights on a fixed batch of task frames, at the start and every `every` steps,
and once more at the end with the exact frames the exporter calibrates on: the grid the
policy finishes training on is the grid the bundle records.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from models.baselines import miniconvs
from models.encoders import FakeQuantAffine


def calibration_frames(task: str, count: int = 256, seed: int = 0) -> np.ndarray:
    """uint8 frames (count, C, H, W) from random-action episodes; the exporter's for discrete tasks."""
    from edge.encoder.calibrate import task_frames
    from edge.envs import make_env

    env = make_env(task, seed=seed)
    if hasattr(env.action_space, "n"):
        return task_frames(task, count, seed)
    env.action_space.seed(seed)
    frames: list[np.ndarray] = []
    obs, _ = env.reset(seed=seed)
    while len(frames) < count:
        frames.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset(seed=seed + len(frames))
    return np.stack(frames).astype(np.uint8)


def recalibrate(policy: Any, frames: np.ndarray) -> list[Any]:
    """Set every es2 MiniConv's storage scales from its own weights; return the first one's
    (the online encoder: SB3 builds it before any target copy) as ActQuant."""
    from edge.encoder.calibrate import calibrate

    recorded: list[Any] = []
    for encoder in miniconvs(policy):
        storage = [m for m in encoder.net if isinstance(m, FakeQuantAffine)]
        if not storage:
            continue
        scales = calibrate(encoder.ir, encoder.weights(), frames)
        for module, q in zip(storage, scales, strict=True):
            module.scale, module.zero_point = float(q.scale), int(q.zero_point)
        if not recorded:
            recorded = scales
    return recorded


def persist_scales(model: Any, frames: np.ndarray) -> list[dict[str, Any]]:
    """Recalibrate, and put the scales into the model's policy_kwargs so model.save() keeps them.

    The scales are plain attributes, not tensors, so they are not in the state dict; a
    model loaded from model.zip is rebuilt from policy_kwargs and gets them back from there.
    """
    from edge.encoder.calibrate import to_extra

    act_quant = recalibrate(model.policy, frames)
    model.policy_kwargs["features_extractor_kwargs"]["act_quant"] = act_quant
    return to_extra(act_quant)


class Es2Calibration(BaseCallback):
    """Recalibrate es2 storage scales at the start, every `every` env steps, and at the end."""

    def __init__(self, task: str, every: int):
        super().__init__()
        self.frames = calibration_frames(task)
        self.every, self.next_at = every, every
        self.scales: list[dict[str, Any]] = []

    def _on_training_start(self) -> None:
        recalibrate(self.model.policy, self.frames)

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_at:
            recalibrate(self.model.policy, self.frames)
            self.next_at += self.every
        return True

    def _on_training_end(self) -> None:
        self.scales = persist_scales(self.model, self.frames)
