"""What `splitedge measure` checks before a sweep starts, so a wrong link, env or bundle is
one line before any process runs: links that cannot carry a closed loop, the env the edge
clients will make, the real-time loop's control rate, and the feature message's size."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploy.link.profiles import LinkProfile, get_profile, refusal
from edge.history import history_tensor
from splitedge.bundle import load_bundle
from splitedge.errors import SplitedgeError
from splitedge.realtime_spec import realtime_spec

if TYPE_CHECKING:
    from deploy.measure import MeasureConfig


def check_links(cfg: MeasureConfig) -> list[LinkProfile]:
    """The profiles to run; a link that cannot carry a closed loop (LoRa) is refused with why."""
    profiles = [get_profile(name, cfg.links_file) for name in cfg.links]
    message = split_message_bytes(cfg.bundle)
    refused = [why for p in profiles if (why := refusal(p, message))]
    if refused:
        raise SplitedgeError("; ".join(refused) + "; drop it from --links")
    return profiles


def check_env(bundle: Path, env: str | None, env_kwargs: dict[str, Any] | None) -> str:
    """Make the env the edge clients will run once, here, so a wrong one (unimportable, wrong
    observation shape) is one line before any process starts; returns its name."""
    return checked_env(bundle, env, env_kwargs)[0]


def checked_env(
    bundle: Path, env: str | None, env_kwargs: dict[str, Any] | None
) -> tuple[str, float | None]:
    """check_env's name, and the control rate the env declares (edge.realtime), if any."""
    from edge.envs import make_policy_env, policy_env_spec
    from edge.realtime import declared_rate_hz

    policy = load_bundle(bundle).policy
    made = make_policy_env(policy, env, env_kwargs, seed=0)
    rate = declared_rate_hz(made)
    made.close()
    return policy_env_spec(policy, env, env_kwargs)[0], rate


def control_rate(cfg: MeasureConfig, env: str, declared: float | None) -> tuple[float | None, str]:
    """The real-time loop's rate and where it came from; None for a sync-only sweep."""
    if cfg.loop == "sync":
        return None, ""
    if cfg.control_hz is not None:
        return cfg.control_hz, "--control-hz"
    if declared is None:
        raise SplitedgeError(
            f"env {env!r} declares no control rate (no dt or tau on the env); "
            "pass --control-hz HZ for the real-time loop"
        )
    return declared, "the env's own step length"


def split_message_bytes(bundle_path: Path) -> int:
    """Bytes of one step's feature tensor: features x the bundle's dtype size (1 uint8, 4
    float32), plus a delay-aware head's actions in flight (D actions of 8 or 4 bytes each)."""
    policy = load_bundle(bundle_path).policy
    out = policy["encoder"]["output"]
    size = 1
    for d in out["shape"]:
        size *= int(d)
    try:
        itemsize = np.dtype(str(out["dtype"])).itemsize
    except TypeError:
        raise SplitedgeError(
            f"bundle {bundle_path}: feature dtype {out['dtype']!r} is not a numpy dtype; "
            "re-export it with `splitedge export`"
        ) from None
    return size * itemsize + _history_bytes(policy, bundle_path)


def _history_bytes(policy: dict[str, Any], bundle_path: Path) -> int:
    """The actions_in_flight bytes of one request, in the wire form the device sends."""
    depth = realtime_spec(policy, f"bundle {bundle_path}").action_history
    if not depth:
        return 0
    action = policy["action"]
    default = 0 if action.get("type") == "discrete" else np.zeros(action.get("shape", [1]))
    return len(history_tensor([default] * depth, action, depth).data)
