"""Your robot code: the device encodes each frame, the server answers with the action."""

import sys
import time

import numpy as np
from dot_env import DotTrack

from edge.client import connect
from splitedge.errors import SplitedgeError

bundle, server = sys.argv[1], sys.argv[2]
for _ in range(60):  # the server may still be starting
    try:
        policy = connect(bundle, server, deadline_s=1.0)
        break
    except SplitedgeError:
        time.sleep(1)
env, rewards = DotTrack(), []
obs, _ = env.reset(seed=1)
with policy:
    for _ in range(100):
        obs, reward, _, _, _ = env.step(policy.act(obs))
        rewards.append(reward)
print(f"100 decisions, mean reward {np.mean(rewards):.3f}, fallbacks {policy.fallbacks}")
