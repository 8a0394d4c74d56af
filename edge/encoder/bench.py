"""Measuring encoders side by side: time per frame, the GL path's fixed cost, actions and returns.

Used by `splitedge bench encoder`; nothing here imports torch (the command adds its torch
reference as one more `encode` callable).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from splitedge.ir import EncoderIR, Layer

Encode = Callable[[np.ndarray], np.ndarray]


def time_side_by_side(
    encoders: dict[str, Encode],
    frames: np.ndarray,
    batch: int,
    seconds: float,
    rounds: int = 3,
    warmup_s: float = 0.2,
) -> dict[str, float]:
    """Median seconds per frame of each encoder; rounds interleave the encoders so drift hits all alike."""
    batches = [frames[i : i + batch] for i in range(0, len(frames) - batch + 1, batch)]
    per_round: dict[str, list[float]] = {name: [] for name in encoders}
    for encode in encoders.values():  # warm-up: shaders compile, buffers grow, caches fill
        calls, start = 0, time.perf_counter()
        while calls < 5 or time.perf_counter() - start < warmup_s:
            encode(batches[calls % len(batches)])
            calls += 1
    for _ in range(rounds):
        for name, encode in encoders.items():
            calls, start = 0, time.perf_counter()
            while True:
                encode(batches[calls % len(batches)])
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / rounds and calls >= 5:
                    break
            per_round[name].append(elapsed / (calls * batch))
    return {name: float(np.median(v)) for name, v in per_round.items()}


def one_layer_ir(ir: EncoderIR) -> tuple[EncoderIR, dict[str, np.ndarray]]:
    """A 1x1 conv to 4 channels on the same input: one pass, so its time is the GL path's fixed cost."""
    layer = Layer("conv", "probe", ir.channels, 4, 1, 1, 0)
    probe = EncoderIR(
        ir.channels,
        ir.height,
        ir.width,
        (layer, Layer("flatten")),
        input_scale=ir.input_scale,
        output_scale=ir.output_scale,
    )
    rng = np.random.default_rng(0)
    weights = {
        "probe.weight": rng.normal(0, 0.5, (4, ir.channels, 1, 1)).astype(np.float32),
        "probe.bias": np.zeros(4, np.float32),
    }
    return probe, weights


def head_actions(head: Any, features: np.ndarray) -> np.ndarray:
    """Actions of the bundle's head.onnx session for uint8 features (B, F)."""
    return np.asarray(head.run(None, {head.get_inputs()[0].name: features})[0]).reshape(
        len(features), -1
    )[:, 0]


def episode_returns(
    encode: Encode, head: Any, task: str, episodes: int, seed: int = 0
) -> list[float]:
    """Closed-loop returns with this encoder in the loop (deterministic head)."""
    from edge.envs import make_env

    env = make_env(task, seed=seed)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, total = False, 0.0
        while not done:
            action = head_actions(head, encode(obs[None]))[0]
            obs, reward, terminated, truncated, _ = env.step(int(action))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns
