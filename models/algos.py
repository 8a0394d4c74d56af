"""PPO, SAC and DDPG set up the same way for every encoder, plus each one's server-side head.

Off-policy pixel agents use one encoder shared by actor and critic, trained by the critic
loss only, with the actor reading detached features (the DrQ / SAC-AE recipe): SB3's
default (separate CNNs) failed DDPG on pixel Pendulum here, and SB3's own sharing trains
the encoder with the actor loss instead.
"""

from __future__ import annotations

from typing import Any

import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.sac.policies import SACPolicy
from stable_baselines3.td3.policies import TD3Policy
from torch import nn

ALGOS = ("ppo", "sac", "ddpg")
DISCRETE_ALGOS = ("ppo",)

# Per-algorithm defaults; the same for every encoder and task (TrainConfig.hyper overrides).
# SAC and DDPG share every off-policy setting, so only the algorithm differs between them
OFF_POLICY: dict[str, Any] = {
    "batch_size": 64,
    "learning_starts": 500,
    "gamma": 0.98,
    "tau": 0.01,
    "train_freq": 1,
    "gradient_steps": 1,
}
HYPER: dict[str, dict[str, Any]] = {
    "ppo": {
        "n_steps": 256,
        "batch_size": 256,
        "n_epochs": 4,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "clip_range": 0.2,
        "ent_coef": 0.0,
    },
    "sac": dict(OFF_POLICY),
    "ddpg": dict(OFF_POLICY),
}
NET_ARCH: dict[str, Any] = {
    "ppo": {"pi": [64, 64], "vf": [64, 64]},
    "sac": [256, 256],
    "ddpg": [256, 256],
}
ACTION_NOISE = 0.3  # DDPG's Gaussian exploration noise, in units of the action half-range


class DetachedFeatures(BaseFeaturesExtractor):
    """The actor's view of the shared encoder: same features, no gradient into the encoder."""

    def __init__(self, encoder: BaseFeaturesExtractor):
        super().__init__(encoder._observation_space, encoder.features_dim)
        self.encoder = encoder

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(observations)


def _actor_optimizer(policy: Any, actor: nn.Module, lr: float) -> torch.optim.Optimizer:
    # the shared encoder belongs to the critic's optimiser only
    params = [p for n, p in actor.named_parameters() if "features_extractor" not in n]
    return policy.optimizer_class(params, lr=lr, **policy.optimizer_kwargs)


def _build_critics(policy: Any, encoder: nn.Module, target: nn.Module | None, lr: float) -> None:
    """Critic on the shared encoder (its optimizer trains the encoder) and a frozen target copy."""
    policy.critic = policy.make_critic(features_extractor=encoder)
    policy.critic_target = policy.make_critic(features_extractor=target)
    policy.critic_target.load_state_dict(policy.critic.state_dict())
    policy.critic.optimizer = policy.optimizer_class(
        policy.critic.parameters(), lr=lr, **policy.optimizer_kwargs
    )
    policy.critic_target.set_training_mode(False)


class CriticEncoderSACPolicy(SACPolicy):
    """SACPolicy whose actor and critic share a critic-trained encoder (actor sees it detached)."""

    def _build(self, lr_schedule: Any) -> None:
        encoder = self.make_features_extractor()
        self.actor = self.make_actor(features_extractor=DetachedFeatures(encoder))
        self.actor.optimizer = _actor_optimizer(self, self.actor, lr_schedule(1))
        _build_critics(self, encoder, None, lr_schedule(1))


class CriticEncoderTD3Policy(TD3Policy):
    """TD3Policy (used by DDPG) with the same critic-trained shared encoder, targets included."""

    def _build(self, lr_schedule: Any) -> None:
        encoder, encoder_target = self.make_features_extractor(), self.make_features_extractor()
        self.actor = self.make_actor(features_extractor=DetachedFeatures(encoder))
        self.actor_target = self.make_actor(features_extractor=DetachedFeatures(encoder_target))
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.actor.optimizer = _actor_optimizer(self, self.actor, lr_schedule(1))
        _build_critics(self, encoder, encoder_target, lr_schedule(1))
        self.actor_target.set_training_mode(False)


def _linear(start: float) -> Any:
    return lambda progress_remaining: progress_remaining * start


def build(
    algo: str,
    venv: Any,
    extractor: dict[str, Any],
    lr: float,
    seed: int,
    hyper: dict[str, Any],
    standard: bool = False,
) -> Any:
    """An SB3 model of `algo` on `venv` with the given features extractor kwargs; `standard`:
    SB3's own off-policy policy class, whose actor trains its own extractor (a distilled
    student's server-side layers), instead of ours, whose actor reads the critic's."""
    from stable_baselines3 import DDPG, PPO, SAC
    from stable_baselines3.common.noise import NormalActionNoise

    kwargs = {**HYPER[algo], **hyper}
    common = {"seed": seed, "device": "cpu", "verbose": 0}
    if algo == "ppo":
        pk = {**extractor, "net_arch": NET_ARCH["ppo"]}
        # decays linearly to 0: PPO on CartPole collapses after solving otherwise
        # a Dict observation: the image with the actions in flight (models/realtime_training.py)
        name = "MultiInputPolicy" if hasattr(venv.observation_space, "spaces") else "CnnPolicy"
        return PPO(name, venv, learning_rate=_linear(lr), policy_kwargs=pk, **common, **kwargs)
    pk = {**extractor, "net_arch": NET_ARCH[algo], "share_features_extractor": False}
    kwargs.setdefault("buffer_size", 100_000)
    dict_obs = hasattr(venv.observation_space, "spaces")
    own = "MultiInputPolicy" if dict_obs else "CnnPolicy"
    if algo == "sac":
        return SAC(
            own if standard else CriticEncoderSACPolicy,
            venv,
            learning_rate=lr,
            policy_kwargs=pk,
            **common,
            **kwargs,
        )
    n = venv.action_space.shape[0]
    half = (venv.action_space.high - venv.action_space.low) / 2
    noise = NormalActionNoise(mean=torch.zeros(n).numpy(), sigma=ACTION_NOISE * half)
    return DDPG(
        own if standard else CriticEncoderTD3Policy,
        venv,
        learning_rate=lr,
        action_noise=noise,
        policy_kwargs=pk,
        **common,
        **kwargs,
    )


def actor_head(algo: str, policy: Any) -> nn.Module:
    """features (B, F) -> deterministic action (logits for PPO): what the policy server runs."""
    if algo == "ppo":
        return nn.Sequential(policy.mlp_extractor.policy_net, policy.action_net)
    if algo == "sac":
        return nn.Sequential(policy.actor.latent_pi, policy.actor.mu, nn.Tanh())  # squashed mean
    return policy.actor.mu  # DDPG: tanh already inside mu


def actor_encoder(algo: str, policy: Any) -> nn.Module:
    """The encoder the deployed actor runs (the device side of the split)."""
    if algo == "ppo":
        return policy.features_extractor
    extractor = policy.actor.features_extractor
    return extractor.encoder if isinstance(extractor, DetachedFeatures) else extractor
