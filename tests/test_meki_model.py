"""The MeKi transformer: equations against hand-written references, KV cache, exact folding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.meki.model import MeKiConfig, MeKiGPT

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, d_model=32, ffn_hidden=48, d_mem=12)


def _model(meki: str = "both", seed: int = 0) -> MeKiGPT:
    """A random model whose norms, alpha and beta are far from their init, so folding is tested."""
    torch.manual_seed(seed)
    model = MeKiGPT(MeKiConfig(meki=meki, **TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "alpha", "beta")):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def test_fold_tables_match_numpy_reference():
    model = _model()
    E = _np(model.wte.weight)
    for layer, block in enumerate(model.blocks):
        mk = block.meki
        g = mk.dynamic
        gate, up = np.split(E @ _np(g.gate_up.weight).T, 2, axis=-1)
        dynamic = (gate / (1 + np.exp(-gate)) * up) @ _np(g.down.weight).T  # SwiGLU(E)
        mixed = _np(mk.static.weight) + mk.beta.item() * dynamic
        want = mk.alpha.item() * _rms(mixed, _np(mk.mix_norm.weight), model.cfg.norm_eps)
        got = model.fold_tables()[:, layer].numpy()
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_block_output_is_ffn_plus_meki_plus_residual():
    model = _model()
    block, eps = model.blocks[0], model.cfg.norm_eps
    x = torch.randn(1, 5, 32)
    ids = torch.randint(0, 97, (1, 5))
    e = block.meki.memory(ids, model.wte(ids))
    from models.meki.model import rope_angles

    cos, sin = rope_angles(torch.arange(5)[None], 16, model.cfg.rope_theta)
    out, _ = block(x, cos, sin, e, None)
    a, _ = block.attn(block.attn_norm(x), cos, sin, None, None)
    h = x + a
    hn = _rms(_np(h), _np(block.ffn_norm.weight), eps)
    gu = hn @ _np(block.ffn.gate_up.weight).T
    ffn = (gu[..., :48] / (1 + np.exp(-gu[..., :48])) * gu[..., 48:]) @ _np(block.ffn.down.weight).T
    gated = 1 / (1 + np.exp(-(hn @ _np(block.meki.gate.weight).T))) + _np(
        e
    )  # sigmoid(W_gate h) + e
    y = _rms(gated @ _np(block.meki.out.weight).T, _np(block.meki.post_norm.weight), eps)
    np.testing.assert_allclose(_np(out), _np(h) + ffn + y, atol=1e-5)


@pytest.mark.parametrize("meki", ["both", "static", "dynamic"])
def test_folded_rows_give_training_form_logits(meki):
    model = _model(meki)
    ids = torch.randint(0, 97, (2, 20))
    ref, _, _ = model(ids)
    rows = model.fold_tables()[ids]  # (B, T, L, d_mem)
    got, _, _ = model(ids, memory=[rows[:, :, i] for i in range(2)])
    assert float((got - ref).abs().max().detach()) <= 1e-4


@pytest.mark.parametrize("meki", ["off", "both"])
def test_kv_cache_decoding_matches_full_forward(meki):
    model = _model(meki)
    ids = torch.randint(0, 97, (1, 16))
    full, _, _ = model(ids)
    past = [(torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16)) for _ in range(2)]
    chunks = []
    for lo, hi in ((0, 9), (9, 10), (10, 16)):
        logits, _, past = model(ids[:, lo:hi], past=past)
        chunks.append(logits)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_cached_attention_equals_explicit_softmax_reference():
    model = _model("off")
    attn = model.blocks[0].attn
    x = torch.randn(1, 6, 32)
    from models.meki.model import cache_mask, rope_angles

    cos, sin = rope_angles(torch.arange(6)[None], 16, model.cfg.rope_theta)
    empty = (torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16))
    got, _ = attn(x, cos, sin, empty, cache_mask(6, 6))
    want, _ = attn(x, cos, sin, None, None)  # torch's fused causal kernel
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dense_and_meki_share_attention_and_ffn_shapes():
    dense, meki = _model("off"), _model("both")
    shapes = {n: p.shape for n, p in dense.named_parameters()}
    meki_shapes = {n: p.shape for n, p in meki.named_parameters() if ".meki." not in n}
    assert shapes == meki_shapes
    assert not any(".meki." in n for n in shapes)
    counts = meki.param_counts()
    static = 2 * 97 * 12
    dynamic = 2 * (32 * 2 * 16 + 16 * 12)  # SwiGLU d_model -> d_model/2 -> d_mem, per layer
    assert counts["folded_away"] == static + dynamic + 2 * (12 + 2)  # + mix norms, alpha, beta
    assert counts["inference"] - dense.param_counts()["total"] == 2 * (2 * 32 * 12 + 32)


def test_training_loss_is_cross_entropy():
    model = _model()
    ids, targets = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    logits, loss, _ = model(ids, targets)
    assert loss is not None
    want = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize(
    "bad", [dict(meki="sideways"), dict(d_model=30), dict(d_mem=0), dict(n_layer=0)]
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        MeKiConfig(**{**TINY, **bad})


def test_dense_model_has_nothing_to_fold():
    with pytest.raises(ValueError, match="dense"):
        _model("off").fold_tables()
