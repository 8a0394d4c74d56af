"""Per-decision compute and bytes of a split policy: device encoder, server head, raw offload.

FLOPs follow torch's FlopCounterMode: 2 per multiply-accumulate of conv and linear layers
(biases, ReLU, pooling and the /255 scaling are not counted; they are O(activations),
small next to the MACs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.algos import actor_encoder, actor_head
from models.baselines import feature_bytes, is_split, raw_bytes


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass of `module` on `example` (batch of 1)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(example)
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    """Number of parameters (weights and biases) in `module`."""
    return sum(p.numel() for p in module.parameters())


def policy_costs(model: Any, algo: str, encoder: str) -> dict[str, Any]:
    """Device/server FLOPs, parameters and bytes per decision for a trained SB3 model."""
    policy = model.policy
    space = model.observation_space
    enc = actor_encoder(algo, policy)
    head = actor_head(algo, policy)
    history = 0
    if hasattr(space, "spaces"):  # delay-aware: the device encodes the image, the head also
        space, history = space["image"], enc.history_dim  # reads the actions in flight
        enc = enc.image
    obs_shape = tuple(int(d) for d in space.shape)
    obs = torch.rand((1, *obs_shape))  # (1, C, H, W) in [0, 1], as SB3 feeds the encoder
    was_training = policy.training
    policy.set_training_mode(False)
    features = enc(obs)  # (1, F)
    head_in = torch.cat([features, torch.zeros((1, history))], dim=1)  # (1, F + history)
    enc_flops, head_flops = count_flops(enc, obs), count_flops(head, head_in)
    policy.set_training_mode(was_training)
    features_dim = int(features.shape[1])
    split = is_split(encoder)
    return {
        "encoder_params": count_params(enc),
        "encoder_flops": enc_flops,
        "head_params": count_params(head),
        "head_flops": head_flops,
        "full_flops": enc_flops + head_flops,
        # what the server runs per request: the head when split, the whole model on raw frames
        "server_flops": head_flops if split else enc_flops + head_flops,
        "features_dim": features_dim,
        "feature_bytes_per_step": feature_bytes(encoder, features_dim),
        "raw_bytes_per_step": raw_bytes(obs_shape),
    }
