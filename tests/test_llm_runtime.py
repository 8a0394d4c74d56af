"""The edge LLM runtime: sampling, the memory-mapped table, residency, no torch, CLI generate/bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge.llm.sampling import Sampler
from edge.llm.table import MemoryTable
from models.meki.fold import fold_run
from models.meki.model import MeKiConfig
from splitedge.errors import SplitedgeError
from tests.test_meki_fold import build_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=300, block_size=24, n_layer=2, n_head=2, d_model=16, ffn_hidden=32, d_mem=8)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-init dense and MeKi bundles of the same shape (fp32 table)."""
    root = tmp_path_factory.mktemp("llm")
    val = np.random.default_rng(0).integers(1, 300, size=400)
    out = {}
    for meki in ("off", "both"):
        model = build_run(root / f"run-{meki}", MeKiConfig(meki=meki, **SMALL), val)
        fold_run(root / f"run-{meki}", root / meki, dtype="fp32", val_tokens=300)
        out[meki] = root / meki
        out[f"model-{meki}"] = model  # type: ignore[assignment]
    return out


def _reference_probs(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    order = np.argsort(-logits)  # by rank, largest first
    z = logits[order] / temperature
    if top_k:
        z[top_k:] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    n = np.argmax(np.cumsum(p) >= top_p) + 1 if top_p < 1 else p.size
    p[n:] = 0
    out = np.zeros_like(p)
    out[order] = p / p.sum()
    return out


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 8, 0.6)]
)
def test_sampler_distribution_matches_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(size=50) * 2
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    want = _reference_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(sampler.probabilities(logits), want, atol=1e-12)
    rng = np.random.default_rng(2)
    counts = np.bincount([sampler(logits, rng) for _ in range(4000)], minlength=50)
    assert np.all(counts[want == 0] == 0)
    assert np.abs(counts / 4000 - want).max() < 0.035  # ~4.5 sigma of a binomial at p=0.5


def test_greedy_and_bad_settings():
    logits = np.array([0.1, 3.0, -1.0])
    assert Sampler(greedy=True)(logits, np.random.default_rng()) == 1
    assert Sampler(temperature=0)(logits, np.random.default_rng()) == 1
    assert Sampler(top_k=1)(logits, np.random.default_rng()) == 1
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0)):
        with pytest.raises(ValueError):
            Sampler(**bad)  # type: ignore[arg-type]


def test_prefetch_advises_each_page_once_until_the_cache_is_dropped(tmp_path):
    import mmap

    from models.meki.export import write_table

    table = np.zeros((200, 3, 8), dtype=np.float32)  # 96-byte records, 19200 bytes
    mt = MemoryTable(tmp_path / "t.bin", write_table(table, tmp_path / "t.bin", "float32"))
    tokens = [3, 3, 42, 5, 150, 42, 199, 0]
    advised: set[int] = set()
    calls = 0
    for t in tokens:  # reference: the pages a record spans, advised when any is new
        pages = set(range(96 * t // mmap.PAGESIZE, (96 * t + 95) // mmap.PAGESIZE + 1))
        calls += not pages <= advised
        advised |= pages
    for t in tokens:
        mt.prefetch(t)
    assert mt.advice_calls == calls
    mt.drop_cache()
    mt.prefetch(3)
    assert mt.advice_calls == calls + 1
    mt.close()


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_table_rows_and_read_accounting(tmp_path, dtype):
    from models.meki.export import quantize_rows, write_table

    table = np.random.default_rng(0).normal(size=(40, 3, 8)).astype(np.float32)
    spec = write_table(table, tmp_path / "t.bin", dtype)
    mt = MemoryTable(tmp_path / "t.bin", spec)
    if dtype == "int8":
        q, scale = quantize_rows(table)
        want = q.astype(np.float32) * scale[..., None]
    else:
        want = table.astype(dtype).astype(np.float32)
    ids = np.array([3, 39, 3, 0])
    np.testing.assert_array_equal(mt.rows(ids), want[ids].transpose(1, 0, 2))
    np.testing.assert_array_equal(mt.rows([7]), want[[7]].transpose(1, 0, 2))
    buf = np.empty((3, 1, 1, 8), dtype=np.float32)
    mt.rows_into(11, buf)
    np.testing.assert_array_equal(buf[:, 0, 0], want[11])
    assert mt.bytes_read == 6 * spec["record_bytes"] and mt.rows_read == 18
    with pytest.raises(ValueError):
        mt.rows([40])
    mt.close()
    with pytest.raises(SplitedgeError, match="re-fold|re-copy"):
        MemoryTable(tmp_path / "t.bin", {**spec, "shape": [41, 3, 8]})


def test_runtime_logits_and_perplexity_match_torch(bundles):
    from edge.llm.runtime import LlmRuntime

    model = bundles["model-both"]
    val = np.fromfile(bundles["both"] / "val_tokens.bin", dtype=np.uint16).astype(np.int64)
    rt = LlmRuntime(bundles["both"])
    with torch.no_grad():
        logits = model(torch.from_numpy(val[:96].reshape(4, 24)))[0]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 300),
            torch.from_numpy(np.stack([val[s + 1 : s + 25] for s in range(0, 96, 24)]).reshape(-1)),
        )
    assert rt.score(val[:97])["val_ppl"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    rt.close()


def test_persistent_step_binding_matches_plain_run(bundles):
    from edge.llm.runtime import LlmRuntime

    bound, plain = LlmRuntime(bundles["both"]), LlmRuntime(bundles["both"], iobinding=False)
    for rt in (bound, plain):
        rt.forward([5, 6, 7])
    for t in (8, 9, 10, 11):
        np.testing.assert_allclose(bound.forward([t]), plain.forward([t]), atol=1e-6)
    bound.close()
    plain.close()


def test_sliding_window_keeps_relative_positions(bundles):
    from edge.llm.runtime import LlmRuntime

    model = bundles["model-both"]
    ids = np.random.default_rng(3).integers(1, 300, size=30)
    rt = LlmRuntime(bundles["both"])
    for t in ids[:24]:
        rt.forward([int(t)])
    got = rt.forward([int(ids[24])])  # context full: keep the newest 12, then add one
    with torch.no_grad():  # reference: torch cache of the full prefix, cut to the same 12 keys
        _, _, past = model(torch.from_numpy(ids[:24])[None])
        past = [(k[:, :, -12:], v[:, :, -12:]) for k, v in past]
        want = model(
            torch.from_numpy(ids[24:25])[None], past=past, position_ids=torch.tensor([[24]])
        )[0]
    np.testing.assert_allclose(got, want[0].numpy(), atol=1e-4)
    gen = rt.generate_ids(ids[:5].tolist(), 60, Sampler(), seed=1, stop_at_eot=False)
    assert len(gen.ids) == 60 and gen.gen_tps > 0
    rt.close()


def test_table_residency_is_a_small_share_after_256_tokens(tmp_path):
    """A 64 MiB table (16384 tokens x 8 layers x 256 fp16): sampling 256 tokens maps only a sliver."""
    from edge.llm.runtime import LlmRuntime

    cfg = MeKiConfig(
        vocab_size=16384, block_size=64, n_layer=8, n_head=2, d_model=16, ffn_hidden=16, d_mem=256
    )
    build_run(tmp_path / "run", cfg, np.arange(200))
    fold_run(tmp_path / "run", tmp_path / "big", dtype="fp16", val_tokens=150)
    rt = LlmRuntime(tmp_path / "big")
    assert rt.table is not None and rt.table.size_bytes == 64 * 2**20
    evicted = rt.table.drop_cache()
    gen = rt.generate_ids(
        list(range(1, 17)),
        256,
        Sampler(temperature=1.0, top_k=0, top_p=1.0),
        seed=0,
        stop_at_eot=False,
    )
    resident = rt.table.resident_bytes()
    touched = len(set(gen.prompt_ids) | set(gen.ids))
    assert touched > 200  # random tokens: every record read is a different page
    assert rt.table.bytes_read == (16 + 255) * 4096
    assert resident is not None
    # each 4 KiB record is one page; kernel fault-around may map up to 16 neighbours that are cached
    limit = 0.05 if evicted else 0.5
    assert resident <= limit * rt.table.size_bytes, (resident, touched)
    rt.close()


def test_edge_runtime_imports_no_torch(bundles):
    code = (
        "import sys\n"
        "from edge.llm.runtime import LlmRuntime\n"
        "import edge.llm.bench, edge.llm.report\n"
        f"rt = LlmRuntime({str(bundles['both'])!r})\n"
        "rt.generate_ids([1, 2, 3], 5)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_cli_generate_streams_text(bundles, capsys):
    from splitedge.cli import main

    assert (
        main(
            [
                "llm",
                "generate",
                "--bundle",
                str(bundles["both"]),
                "--max-new-tokens",
                "12",
                "--seed",
                "3",
                "--json",
                "The",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "The" and 1 <= result["new_tokens"] <= 12
    assert main(["llm", "generate", "--bundle", str(bundles["both"]), "--top-p", "2", "x"]) == 2


def test_cli_bench_side_by_side(bundles, tmp_path, capsys):
    from splitedge.cli import main

    report = tmp_path / "meki.md"
    assert (
        main(
            [
                "llm",
                "bench",
                "--bundle",
                str(bundles["off"]),
                "--bundle",
                str(bundles["both"]),
                "--rounds",
                "2",
                "--new-tokens",
                "8",
                "--prompt-tokens",
                "4",
                "--ppl-tokens",
                "100",
                "--launches",
                "2",
                "--report",
                str(report),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    dense, meki = result["bundles"]
    assert dense["gen_ratio"] == 1.0 and meki["gen_ratio"] > 0
    assert result["timed_rounds"] == 2  # two fresh worker sets, one timed round each
    assert dense["gen_tps_min_max"][0] <= dense["gen_tps"] <= dense["gen_tps_min_max"][1]
    assert dense["gen_ratio_cpu"] == 1.0 and meki["gen_ratio_cpu"] > 0
    assert meki["optimized_ops"] - dense["optimized_ops"] == 2 * 4  # sigmoid, add, W_out, norm
    assert result["perplexity_comparable"] is True  # both runs share one (deterministic) tokenizer
    assert dense["val_tokens"] == meki["val_tokens"] == 96
    assert meki["after_first_generation"]["table_bytes_read"] == (4 + 7) * 2 * 8 * 4
    assert not dense["after_all"]["torch_imported"] and not meki["after_all"]["torch_imported"]
    text = report.read_text()
    assert "splitedge llm bench" in text and "| both d_mem=8 |" in text
    assert "2 launches of fresh workers x 1 timed rounds (+1 warm-up) = 2 rounds" in text
    # workers are pinned to one CPU by default, and the report says which
    allowed = os.sched_getaffinity(0)
    assert result["config"]["cpu"] == max(allowed) and f"pinned to CPU {max(allowed)}" in text
    # W_gate and W_out: the MeKi decoder carries 2 * L * d_model * d_mem more float32 weights
    extra = meki["decoder_bytes"] - dense["decoder_bytes"]
    w_gate_and_out = 2 * SMALL["n_layer"] * SMALL["d_model"] * SMALL["d_mem"] * 4
    assert w_gate_and_out <= extra < w_gate_and_out + 4096  # + post-norm gains, node protos
    bad = str(max(allowed) + 1)
    assert main(["llm", "bench", "--bundle", str(bundles["off"]), "--cpu", bad]) == 2


def _fake(name: str, meki: str, d_model: int, gen_tps: float, ppl: float) -> dict:
    config = dict(
        meki=meki, d_mem=8, d_model=d_model, n_layer=2, n_head=2, ffn_hidden=32, vocab_size=300
    )
    return {"name": name, "llm": {"config": config}, "config": config}


def _fake_result(specs: list[tuple]) -> tuple[dict, list[int]]:
    """A bench result for (name, meki, d_model, gen tok/s, ppl) specs, and each one's baseline."""
    from edge.llm.bench import SHAPE_KEYS, baselines

    fakes = [_fake(*s[:3], s[3], s[4]) for s in specs]
    base_of = baselines(fakes)
    result = {
        "perplexity_comparable": True,
        "bundles": [
            {
                "name": name,
                "meki": meki,
                "shape": {k: f["config"][k] for k in SHAPE_KEYS},
                "baseline": j,
                "val_ppl": ppl,
                "gen_tps": tps,
                "gen_ratio": tps / specs[j][3],
                "gen_ratio_cpu": tps / specs[j][3],
                "decoder_nodes": 10,
                "after_first_generation": {},
            }
            for (name, meki, _, tps, ppl), f, j in zip(specs, fakes, base_of, strict=True)
        ],
    }
    return result, base_of


def test_each_meki_bundle_is_compared_with_the_dense_bundle_of_its_shape():
    from edge.llm.report import bars

    specs = [  # name, meki, d_model, gen tok/s, ppl
        ("dense-a", "off", 16, 1000.0, 50.0),
        ("meki-a", "both", 16, 900.0, 45.0),
        ("dense-b", "off", 32, 500.0, 40.0),
        ("meki-b", "both", 32, 490.0, 41.0),
        ("meki-c", "both", 64, 100.0, 30.0),  # no dense of its shape: falls back to bundle 0
    ]
    result, base_of = _fake_result(specs)
    assert base_of == [0, 0, 2, 2, 0]
    got = {c["bundle"]: c for c in bars(result)}
    assert set(got) == {"meki-a", "meki-b"}  # meki-c has no dense bundle of its shape
    assert got["meki-a"]["dense"] == "dense-a" and got["meki-b"]["dense"] == "dense-b"
    assert got["meki-a"]["gen_ratio"] == 0.9 and not got["meki-a"]["gen_ratio>=0.97"]
    assert got["meki-b"]["gen_ratio"] == 0.98 and got["meki-b"]["gen_ratio>=0.97"]
    assert got["meki-a"]["ppl_lower_than_dense"] and not got["meki-b"]["ppl_lower_than_dense"]
    ratio = 490 / 500  # the fake's paired ratio
    assert got["meki-b"]["extra_us_per_token"] == round(1e6 / 500 * (1 / ratio - 1), 1)


def test_bench_says_when_a_worker_dies():
    import multiprocessing as mp
    from types import SimpleNamespace

    from edge.llm.bench import _reply

    parent, child = mp.Pipe()
    child.close()  # what the parent sees when a worker is killed mid-run
    with pytest.raises(SplitedgeError, match="exit code -9"):
        _reply((parent, SimpleNamespace(exitcode=-9)))


def test_a_second_dense_bundle_of_a_shape_is_reported_as_an_a_a_check():
    from edge.llm.report import _speed_note

    specs = [("dense", "off", 16, 1000.0, 50.0), ("dense-aa", "off", 16, 980.0, 50.0)]
    specs.append(("meki", "both", 16, 970.0, 50.0))
    result, base_of = _fake_result(specs)
    assert base_of == [0, 0, 0]  # the copy is compared with the first dense bundle
    text = "\n".join(_speed_note(result))
    assert "A/A check: dense-aa has the weights and graph of dense" in text
    assert "at 0.980x its speed" in text and "speed bar met by meki" in text
