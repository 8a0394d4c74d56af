"""Train a dense or MeKi LM on the prepared corpus; checkpoints carry their own config."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.meki.data import DataConfig, eval_windows, load_tokens, prepare, random_batches
from models.meki.model import MeKiConfig, MeKiGPT

CKPT = "ckpt.pt"
VAL_TOKENS = "val_tokens.bin"


@dataclass
class TrainConfig:
    """Optimisation settings; the model and data configs ride along so a run is one artifact."""

    model: MeKiConfig = field(default_factory=MeKiConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_tokens: int = 65536  # validation tokens scored at the end (all of val if fewer)
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_tokens", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def _optimizer(model: MeKiGPT, cfg: TrainConfig) -> torch.optim.Optimizer:
    # decay matrices only; norms, alpha/beta and memory tables are left undecayed
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_table = name.endswith("meki.static.weight")
        (decay if p.dim() >= 2 and not is_table else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model: MeKiGPT, tokens: np.ndarray, limit: int) -> dict[str, float]:
    """Mean next-token cross-entropy and perplexity over consecutive block-size windows."""
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_windows(tokens, model.cfg.block_size, limit):
        _, loss, _ = model(torch.from_numpy(x), torch.from_numpy(y))
        assert loss is not None
        total += float(loss) * y.size
        count += y.size
    model.train()
    if count == 0:
        raise ValueError(f"validation set too small for block_size={model.cfg.block_size}")
    return {"val_loss": total / count, "val_ppl": math.exp(total / count), "val_tokens": count}


def save_checkpoint(path: Path, model: MeKiGPT, cfg: TrainConfig, result: dict[str, Any]) -> None:
    """model weights + every config needed to rebuild it, in one file."""
    torch.save(
        {
            "model_config": model.cfg.to_dict(),
            "train_config": _plain(cfg),
            "state_dict": model.state_dict(),
            "result": result,
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[MeKiGPT, dict[str, Any]]:
    """Rebuild a model from a checkpoint alone; returns (model in eval mode, checkpoint dict)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = MeKiGPT(MeKiConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def _plain(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))


def train(cfg: TrainConfig, data_dir: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Prepare data if needed, train, evaluate, write ckpt.pt/result.json/tokenizer.json to out_dir."""
    meta = prepare(cfg.data, data_dir)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {meta['vocab_size']} tokens but model vocab_size is "
            f"{cfg.model.vocab_size}; raise the model's vocab_size"
        )
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = MeKiGPT(cfg.model)
    opt = _optimizer(model, cfg)
    train_tokens, val_tokens = (
        load_tokens(data_dir / "train.bin"),
        load_tokens(data_dir / "val.bin"),
    )
    batches = random_batches(
        train_tokens, cfg.batch_size, cfg.model.block_size, np.random.default_rng(cfg.seed)
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = _progress(cfg.steps, progress)
    t0, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = next(batches)
        _, loss, _ = model(torch.from_numpy(x), torch.from_numpy(y))
        assert loss is not None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "command": " ".join(["splitedge", *sys.argv[1:]])
        if "splitedge" in sys.argv[0]
        else "python API",
        "steps": cfg.steps,
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.model.block_size,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": float(np.mean(losses[-20:])),
        **evaluate(model, val_tokens, cfg.eval_tokens),
        "params": model.param_counts(),
        "data": {k: meta[k] for k in ("digest", "vocab_size", "eot_id", "tokens")},
    }
    save_checkpoint(out_dir / CKPT, model, cfg, result)
    shutil.copyfile(data_dir / "tokenizer.json", out_dir / "tokenizer.json")
    # the scored validation tokens travel with the run so bundles can be scored on the device
    np.asarray(val_tokens[: cfg.eval_tokens + 1]).tofile(out_dir / VAL_TOKENS)
    (out_dir / "result.json").write_text(
        json.dumps({**result, "config": _plain(cfg)}, indent=2) + "\n"
    )
    return result


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
