"""The same training with SB3's default CnnPolicy (NatureCNN): nothing of splitedge in it."""

import sys
from pathlib import Path

from dot_env import DotTrack
from stable_baselines3 import PPO

steps, out = int(sys.argv[1]), Path(sys.argv[2])
model = PPO("CnnPolicy", DotTrack(), n_steps=512, batch_size=128, seed=0)
model.learn(steps)
out.mkdir(parents=True, exist_ok=True)
model.save(out / "model.zip")
