"""The folded table and the decoder against DESIGN.md's MeKi equations, written out in numpy here.

Nothing of the model's own code computes the reference: the weights are read from the
checkpoint's state dict and the equations are evaluated in float64,

    T_l = alpha_l * RMSNorm_mix(M_l + beta_l * G_l(E))          G_l = SwiGLU d_model -> d_mem
    y   = RMSNorm_post(W_out(sigmoid(W_gate h) + T_l[x]))      h = pre-FFN normalised state
    H'  = FFN(h) + y + residual

then compared with the table file as stored (fp32) and the ONNX decoder's logits. alpha, beta
and every norm gain are set away from their init of 1, so a term dropped or moved changes the
result; each mutation below (one term changed) must fail the same tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.meki.fold import fold_run
from models.meki.model import MeKiConfig
from models.meki.train import CKPT, load_checkpoint, save_checkpoint
from tests.test_llm_runtime import SMALL
from tests.test_meki_fold import build_run

TOL = 1e-5  # fp32 table and decoder vs the float64 equations
EPS = 1e-5  # MeKiConfig.norm_eps, restated
FOLD_MUTATIONS = ("beta on the static term", "no mix norm", "relu in G", "no alpha")
LAYER_MUTATIONS = ("multiplicative fusion", "no sigmoid", "no post norm", "memory after FFN")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A MeKi checkpoint with non-trivial alpha/beta/norm gains, folded into an fp32 bundle."""
    root = tmp_path_factory.mktemp("meki-eq")
    cfg = MeKiConfig(meki="both", **SMALL)
    val = np.random.default_rng(0).integers(1, SMALL["vocab_size"], size=200)
    build_run(root / "run", cfg, val)
    model, ckpt = load_checkpoint(root / "run" / CKPT)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "beta")) or "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g) * 1.5)  # in [0.5, 2)
            elif "dynamic" in name or "meki.gate" in name or name == "wte.weight":
                # G(E) as large as M[x], and a gate that is not flat at sigmoid(0)
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    from models.meki.train import TrainConfig

    save_checkpoint(
        root / "run" / CKPT, model, TrainConfig(model=cfg, steps=2, warmup_steps=0), ckpt["result"]
    )
    fold_run(root / "run", root / "b", dtype="fp32", val_tokens=100)
    weights = {k: v.double().numpy() for k, v in model.state_dict().items()}
    return {"bundle": root / "b", "w": weights, "cfg": cfg}


def rmsnorm(x: np.ndarray, gain: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * gain


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def swiglu(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray, act=silu) -> np.ndarray:
    hidden = gate_up.shape[0] // 2
    gu = x @ gate_up.T
    return (act(gu[..., :hidden]) * gu[..., hidden:]) @ down.T


def fold_reference(w: dict, n_layer: int, mutation: str | None = None) -> np.ndarray:
    """T (V, L, d_mem) from the equation; `mutation` changes one term."""
    E = w["wte.weight"]
    tables = []
    for i in range(n_layer):
        p = f"blocks.{i}.meki."
        M, alpha, beta = w[p + "static.weight"], w[p + "alpha"], w[p + "beta"]
        act = (lambda x: np.maximum(x, 0)) if mutation == "relu in G" else silu
        G = swiglu(E, w[p + "dynamic.gate_up.weight"], w[p + "dynamic.down.weight"], act)
        mixed = beta * M + G if mutation == "beta on the static term" else M + beta * G
        normed = mixed if mutation == "no mix norm" else rmsnorm(mixed, w[p + "mix_norm.weight"])
        tables.append(normed if mutation == "no alpha" else alpha * normed)
    return np.stack(tables, axis=1)


def rope(x: np.ndarray, pos: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Rotate (first half, second half) pairs of x (H, T, hd) by position angles."""
    hd = x.shape[-1]
    angles = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)  # (T, hd/2)
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def logits_reference(
    w: dict, cfg: MeKiConfig, table: np.ndarray, ids: np.ndarray, mutation: str | None = None
) -> np.ndarray:
    """Logits (T, V) of the whole decoder, uncached, from the equations."""
    E, T, H = w["wte.weight"], ids.size, cfg.n_head
    hd = cfg.d_model // H
    pos = np.arange(T, dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = E[ids]
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        a = rmsnorm(x, w[b + "attn_norm.weight"])
        q, k, v = (
            t.reshape(T, H, hd).transpose(1, 0, 2)
            for t in np.split(a @ w[b + "attn.qkv.weight"].T, 3, -1)
        )
        q, k = rope(q, pos), rope(k, pos)
        att = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + (att @ v).transpose(1, 0, 2).reshape(T, cfg.d_model) @ w[b + "attn.proj.weight"].T
        h = rmsnorm(x, w[b + "ffn_norm.weight"])
        ffn = swiglu(h, w[b + "ffn.gate_up.weight"], w[b + "ffn.down.weight"])
        m = b + "meki."
        e = table[ids, i]  # (T, d_mem)
        h_mem = rmsnorm(x + ffn, w[b + "ffn_norm.weight"]) if mutation == "memory after FFN" else h
        gate = h_mem @ w[m + "gate.weight"].T
        fused = {
            "multiplicative fusion": sigmoid(gate) * e,
            "no sigmoid": gate + e,
        }.get(mutation or "", sigmoid(gate) + e)
        out = fused @ w[m + "out.weight"].T
        y = out if mutation == "no post norm" else rmsnorm(out, w[m + "post_norm.weight"])
        x = x + ffn + y
    return rmsnorm(x, w["norm.weight"]) @ E.T


def _stored_table(bundle: Path, cfg: MeKiConfig) -> np.ndarray:
    return np.fromfile(bundle / "table.bin", dtype="<f4").reshape(
        cfg.vocab_size, cfg.n_layer, cfg.d_mem
    )


def test_folded_table_is_the_equation(run):
    want = fold_reference(run["w"], run["cfg"].n_layer)
    got = _stored_table(run["bundle"], run["cfg"])
    assert np.abs(got - want).max() <= TOL
    assert np.abs(want).max() > 0.1  # values of a size where TOL means something


@pytest.mark.parametrize("mutation", FOLD_MUTATIONS)
def test_the_fold_check_fails_when_one_term_changes(run, mutation):
    mutated = fold_reference(run["w"], run["cfg"].n_layer, mutation)
    got = _stored_table(run["bundle"], run["cfg"])
    assert np.abs(got - mutated).max() > 100 * TOL, mutation


def test_decoder_logits_are_the_equations(run):
    from edge.llm.runtime import LlmRuntime

    ids = np.random.default_rng(2).integers(0, SMALL["vocab_size"], size=20)
    table = fold_reference(run["w"], run["cfg"].n_layer)
    want = logits_reference(run["w"], run["cfg"], table, ids)
    rt = LlmRuntime(run["bundle"])
    got = np.concatenate([rt.forward(ids[:12].tolist())] + [rt.forward([int(t)]) for t in ids[12:]])
    rt.close()
    assert np.abs(got - want).max() <= TOL
    for mutation in LAYER_MUTATIONS:  # the same comparison catches each one-term change
        mutated = logits_reference(run["w"], run["cfg"], table, ids, mutation)
        assert np.abs(got - mutated).max() > 10 * TOL, mutation
