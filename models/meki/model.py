"""A small decoder-only transformer with a MeKi token memory in every layer (nanoGPT style).

Blocks are pre-norm: RMSNorm, causal self-attention with RoPE, then an FFN (SwiGLU) and,
in parallel with it, the MeKi module of DESIGN.md:

    static  = M_l[x]                                   # (V, d_mem) table
    dynamic = G_l(E[x])                                # SwiGLU d_model -> d_model/2 -> d_mem
    e       = alpha_l * RMSNorm_mix(static + beta_l * dynamic)
    y       = RMSNorm_post(W_out(sigmoid(W_gate h) + e))
    H'      = FFN(h) + y + residual                    # h = pre-FFN normalised hidden state

`e` depends only on the token id, so after training it folds into one table per layer
(`MeKiGPT.fold_tables`); the same forward then takes those rows as `memory` instead.
With `meki="off"` the model is the dense baseline with identical attention/FFN shapes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MEKI_MODES = ("off", "static", "dynamic", "both")
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class MeKiConfig:
    """Shape of the model; written into every checkpoint and bundle."""

    vocab_size: int = 2048
    block_size: int = 256  # training context; the runtime slides a window of this size
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    ffn_hidden: int = 352  # SwiGLU hidden width (~8/3 d_model, rounded to 32)
    meki: str = "both"  # "off" = dense baseline; "static"/"dynamic" = ablations
    d_mem: int = 64  # width of each layer's token memory row
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.meki not in MEKI_MODES:
            raise ValueError(f"meki must be one of {MEKI_MODES}, got {self.meki!r}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"d_model={self.d_model} must split into n_head={self.n_head} heads of even width"
            )
        for name in ("vocab_size", "block_size", "n_layer", "d_model", "ffn_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.meki != "off" and self.d_mem <= 0:
            raise ValueError(f"d_mem must be positive when meki={self.meki!r}, got {self.d_mem}")

    @property
    def has_memory(self) -> bool:
        return self.meki != "off"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (written so onnxruntime fuses it into one op)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one matmul."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(d_in, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)  # (B, T, hidden) each
        return self.finish(gate, up)

    def finish(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The rest after the gate/up matmul: (B, T, hidden) twice -> (B, T, d_out)."""
        return self.down(F.silu(gate) * up)


def rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> KV:
    """cos, sin of RoPE angles for positions (B, T) -> (B, 1, T, head_dim/2) each."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = position_ids.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, T, hd/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (first half, second half) pairs of x (B, H, T, hd) by the angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE and an optional KV cache."""

    def __init__(self, cfg: MeKiConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: KV | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KV]:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
            for t in self.qkv(x).split(C, dim=2)
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is None:  # training / no cache: fused causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # cached decoding: written out so the exported graph stays a few plain ops
            assert mask is not None
            k = torch.cat([past[0], k], dim=2)  # (B, H, P+T, hd)
            v = torch.cat([past[1], v], dim=2)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, P+T)
            att = torch.softmax(att + mask, dim=-1)
            y = att @ v  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y), (k, v)


def cache_mask(T: int, total: int | torch.Tensor) -> torch.Tensor:
    """Additive mask (T, total): query i (absolute total-T+i) sees cached keys and new keys <= i."""
    keys = torch.arange(total) - (total - T)  # key position relative to the first new token
    allowed = keys[None, :] <= torch.arange(T)[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


class MeKi(nn.Module):
    """Token memory of one layer: e(x) from the token alone, fused with h by a sigmoid gate."""

    def __init__(self, cfg: MeKiConfig):
        super().__init__()
        self.mode = cfg.meki
        self.static = (
            nn.Embedding(cfg.vocab_size, cfg.d_mem) if cfg.meki in ("static", "both") else None
        )
        self.dynamic = (
            SwiGLU(cfg.d_model, cfg.d_model // 2, cfg.d_mem)
            if cfg.meki in ("dynamic", "both")
            else None
        )
        self.mix_norm = RMSNorm(cfg.d_mem, cfg.norm_eps)
        self.alpha = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.ones(()))
        self.gate = nn.Linear(cfg.d_model, cfg.d_mem, bias=False)  # W_gate
        self.out = nn.Linear(cfg.d_mem, cfg.d_model, bias=False)  # W_out
        self.post_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def memory(self, idx: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """e = alpha * RMSNorm_mix(M[x] + beta * G(E[x])): (B, T) ids, (B, T, C) -> (B, T, d_mem)."""
        mixed = torch.zeros((), dtype=emb.dtype)
        if self.static is not None:
            mixed = mixed + self.static(idx)
        if self.dynamic is not None:
            mixed = mixed + self.beta * self.dynamic(emb)
        return self.alpha * self.mix_norm(mixed)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """y = RMSNorm_post(W_out(sigmoid(W_gate h) + e)): (B, T, C), (B, T, d_mem) -> (B, T, C)."""
        return self.fuse(self.gate(h), e)

    def fuse(self, gate_h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """y from an already computed W_gate h (B, T, d_mem) and e (B, T, d_mem)."""
        return self.post_norm(self.out(torch.sigmoid(gate_h) + e))


class Block(nn.Module):
    """Pre-norm block: attention, then FFN and MeKi in parallel on the same normalised h."""

    def __init__(self, cfg: MeKiConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden, cfg.d_model)
        self.meki = MeKi(cfg) if cfg.has_memory else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        e: torch.Tensor | None,
        past: KV | None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.attn_norm(x), cos, sin, past, mask)
        x = x + a
        h = self.ffn_norm(x)
        if self.meki is None:
            return x + self.ffn(h), present
        assert e is not None
        # W_gate reads the same h as the FFN's gate/up: one matmul for both (exact, one op
        # fewer per layer in the exported graph, where the concat folds into a constant)
        w = torch.cat([self.ffn.gate_up.weight, self.meki.gate.weight])
        hidden, d_mem = self.ffn.hidden, self.meki.gate.out_features
        gate, up, gate_h = F.linear(h, w).split([hidden, hidden, d_mem], dim=-1)
        return x + self.ffn.finish(gate, up) + self.meki.fuse(gate_h, e), present


class MeKiGPT(nn.Module):
    """Decoder-only LM; token embedding E is shared with the output head and with every G_l."""

    def __init__(self, cfg: MeKiConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual-branch outputs by depth
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        memory: list[torch.Tensor] | None = None,
        past: list[KV] | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[KV]]:
        """idx (B, T) -> logits (B, T, V), mean cross-entropy if targets, KV per layer.

        memory: folded rows per layer [(B, T, d_mem)]; None computes them in training form.
        past: cached (key, value) per layer [(B, H, P, hd)]; position_ids: (B, T) absolute.
        """
        B, T = idx.shape
        if position_ids is None:
            start = 0 if past is None else past[0][0].shape[2]
            position_ids = torch.arange(start, start + T, device=idx.device)[None].expand(B, T)
        cos, sin = rope_angles(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        mask = None if past is None else cache_mask(T, past[0][0].shape[2] + T)
        emb = self.wte(idx)  # (B, T, C)
        x = emb
        presents = []
        for i, block in enumerate(self.blocks):
            e = None
            if block.meki is not None:
                e = memory[i] if memory is not None else block.meki.memory(idx, emb)
            x, kv = block(x, cos, sin, e, None if past is None else past[i], mask)
            presents.append(kv)
        logits = F.linear(self.norm(x), self.wte.weight)  # (B, T, V), tied head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss, presents

    @torch.no_grad()
    def fold_tables(self) -> torch.Tensor:
        """Re-parameterise: T_l = alpha_l * RMSNorm_mix(M_l + beta_l G_l(E)) -> (V, L, d_mem)."""
        if not self.cfg.has_memory:
            raise ValueError("a dense model (meki='off') has no token memory to fold")
        ids = torch.arange(self.cfg.vocab_size)[None]  # (1, V)
        emb = self.wte(ids)
        rows = [block.meki.memory(ids, emb)[0] for block in self.blocks if block.meki is not None]
        return torch.stack(rows, dim=1)  # (V, L, d_mem), token-major

    def param_counts(self) -> dict[str, int]:
        """Parameters by where they live after folding: compute (RAM) vs folded into the table."""
        folded = 0
        for block in self.blocks:
            if block.meki is not None:
                for sub in (block.meki.static, block.meki.dynamic, block.meki.mix_norm):
                    folded += sum(p.numel() for p in sub.parameters()) if sub is not None else 0
                folded += 2  # alpha, beta
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "folded_away": folded, "inference": total - folded}
