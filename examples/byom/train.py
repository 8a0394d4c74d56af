"""Train PPO on your own env with SB3, as usual; only the features extractor is ours."""

import sys
from pathlib import Path

from dot_env import DotTrack
from stable_baselines3 import PPO

from models.encoders import MiniConvExtractor  # SB3's default CnnPolicy (NatureCNN) exports too

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
out = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/dot")
kwargs = {"features_extractor_class": MiniConvExtractor}
model = PPO("CnnPolicy", DotTrack(), policy_kwargs=kwargs, n_steps=512, batch_size=128, seed=0)
model.learn(steps)
out.mkdir(parents=True, exist_ok=True)
model.save(out / "model.zip")
