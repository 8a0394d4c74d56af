"""Data prep, a tiny training run, folding into fp32/fp16/int8 tables, and the llm bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.meki.data import DataConfig, split_documents
from models.meki.export import merge_add_chains, quantize_rows, write_table
from models.meki.fold import fold_run
from models.meki.model import MeKiConfig, MeKiGPT
from models.meki.train import CKPT, VAL_TOKENS, TrainConfig, load_checkpoint, save_checkpoint, train
from splitedge.bundle import load_bundle, verify_files

# stated tolerances for the stored table vs the training form (relative perplexity change)
FP16_PPL_CHANGE = 0.001  # 0.1 %
INT8_PPL_CHANGE = 0.01  # 1 %


def build_run(run_dir: Path, cfg: MeKiConfig, val_tokens: np.ndarray, seed: int = 0) -> MeKiGPT:
    """A run directory from a random-init model (no training): ckpt, tokenizer, val tokens."""
    from models.meki.data import pydoc_documents, train_tokenizer

    torch.manual_seed(seed)
    model = MeKiGPT(cfg).eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(pydoc_documents()[:20], 300)
    tok.save(str(run_dir / "tokenizer.json"))
    result = {"command": "test", "data": {"eot_id": 0}, "steps": 0}
    save_checkpoint(run_dir / CKPT, model, TrainConfig(model=cfg, steps=2, warmup_steps=0), result)
    np.asarray(val_tokens, dtype=np.uint16).tofile(run_dir / VAL_TOKENS)
    return model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-step MeKi run on the pydoc topics with a 512-token vocabulary."""
    root = tmp_path_factory.mktemp("meki")
    cfg = TrainConfig(
        model=MeKiConfig(
            vocab_size=512, block_size=64, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, d_mem=16
        ),
        data=DataConfig(vocab_size=512, stdlib_docstrings=False),
        steps=60,
        batch_size=8,
        warmup_steps=5,
        eval_tokens=2048,
        lr=1e-2,
    )
    train(cfg, root / "data", root / "run", progress=False)
    return root


def test_prepared_data_is_the_seeded_document_split(trained_run):
    from tokenizers import Tokenizer

    from models.meki.data import pydoc_documents

    meta = json.loads((trained_run / "data" / "meta.json").read_text())
    train_docs, val_docs = split_documents(pydoc_documents(), 0.1, 1337)
    assert meta["documents"] == {"train": len(train_docs), "val": len(val_docs)}
    tok = Tokenizer.from_file(str(trained_run / "data" / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    want = []
    for doc in val_docs:
        want += tok.encode(doc).ids + [eot]
    np.testing.assert_array_equal(
        np.fromfile(trained_run / "data" / "val.bin", dtype=np.uint16), want
    )
    assert tok.get_vocab_size() == 512
    assert set(train_docs).isdisjoint(val_docs)


def test_training_lowers_loss_below_uniform(trained_run):
    result = json.loads((trained_run / "run" / "result.json").read_text())
    assert result["val_loss"] < math.log(512) - 1.0  # clearly better than guessing
    model, ckpt = load_checkpoint(trained_run / "run" / CKPT)
    assert ckpt["model_config"]["meki"] == "both" and model.cfg.d_mem == 16


@pytest.mark.parametrize(
    "dtype,limit", [("fp32", 1e-6), ("fp16", FP16_PPL_CHANGE), ("int8", INT8_PPL_CHANGE)]
)
def test_fold_bundle_matches_training_form(trained_run, dtype, limit):
    out = trained_run / f"bundle-{dtype}"
    manifest = fold_run(trained_run / "run", out, dtype=dtype, val_tokens=1024)
    check = manifest["llm"]["fold_check"]
    assert check["max_abs_logit_diff_fp32_fold"] <= 1e-4
    assert abs(check["val_ppl_change_pct"]) / 100 <= limit
    # the reference perplexity, recomputed here from the checkpoint in torch
    model, _ = load_checkpoint(trained_run / "run" / CKPT)
    val = np.fromfile(out / "val_tokens.bin", dtype=np.uint16).astype(np.int64)
    nll = []
    with torch.no_grad():
        for s in range(0, val.size - 64, 64):
            x = torch.from_numpy(val[s : s + 64])[None]
            logits, _, _ = model(x)
            nll.append(
                torch.nn.functional.cross_entropy(
                    logits[0], torch.from_numpy(val[s + 1 : s + 65]), reduction="none"
                )
            )
    assert check["val_ppl_training_form"] == pytest.approx(
        math.exp(float(torch.cat(nll).mean())), rel=1e-5
    )
    bundle = load_bundle(out)
    assert bundle.kind == "llm" and not verify_files(bundle.root, bundle.manifest)
    table = manifest["llm"]["table"]
    assert table["layout"] == "token-major" and table["shape"] == [512, 2, 16]
    assert (out / "table.bin").stat().st_size == 512 * table["record_bytes"]


def test_onnx_decoder_with_cache_matches_torch(trained_run):
    from edge.llm.runtime import LlmRuntime

    out = trained_run / "bundle-fp32"
    if not out.exists():
        fold_run(trained_run / "run", out, dtype="fp32", val_tokens=1024)
    model, _ = load_checkpoint(trained_run / "run" / CKPT)
    ids = np.fromfile(out / "val_tokens.bin", dtype=np.uint16)[:40].astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)[None])[0][0].numpy()  # training form, no cache
    rt = LlmRuntime(out)
    got = np.concatenate([rt.forward(ids[:30].tolist())] + [rt.forward([int(t)]) for t in ids[30:]])
    rt.close()
    assert np.abs(got - ref).max() <= 1e-4


def test_add_chains_merge_into_one_sum_with_the_same_values():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    vec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8]) for n in "abcde"]
    nodes = [
        helper.make_node("Add", ["a", "b"], ["ab"]),  # only read by the next Add: merged
        helper.make_node("Add", ["ab", "c"], ["abc"]),
        helper.make_node("Add", ["abc", "d"], ["abcd"]),  # abc has two readers: kept
        helper.make_node("Mul", ["abc", "e"], ["m"]),
        helper.make_node("Add", ["abcd", "m"], ["out"]),
    ]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", vec, out), opset_imports=[helper.make_opsetid("", 17)]
    )
    assert merge_add_chains(model.graph) == 2  # ab into abc, abcd into out
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Sum") == 2 and ops.count("Add") == 0
    rng = np.random.default_rng(0)
    x = {n: rng.normal(size=(1, 8)).astype(np.float32) for n in "abcde"}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    abc = x["a"] + x["b"] + x["c"]
    np.testing.assert_array_equal(sess.run(None, x)[0], abc + x["d"] + abc * x["e"])


def test_meki_decoder_residual_is_one_sum_per_layer(trained_run):
    import onnx

    out = trained_run / "bundle-fp32"
    if not out.exists():
        fold_run(trained_run / "run", out, dtype="fp32", val_tokens=1024)
    graph = onnx.load(str(out / "decoder.onnx")).graph
    sums = [n for n in graph.node if n.op_type == "Sum"]
    assert len(sums) == 2  # x + FFN(h) + y in each of the two layers
    assert (
        json.loads((out / "manifest.json").read_text())["llm"]["decoder"]["add_chains_merged"] == 2
    )


def test_int8_rows_are_within_half_a_step(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 3, 8)).astype(np.float32)
    q, scale = quantize_rows(table)
    np.testing.assert_allclose(scale, np.abs(table).max(-1) / 127, rtol=1e-6)
    assert np.all(
        np.abs(q.astype(np.float32) * scale[..., None] - table) <= scale[..., None] / 2 + 1e-7
    )
    entry = write_table(table, tmp_path / "t.bin", "int8")
    assert entry["record_bytes"] == 3 * 8 + 3 * 4
    raw = np.fromfile(tmp_path / "t.bin", dtype=np.uint8).reshape(50, 36)
    np.testing.assert_array_equal(raw[:, :24].view(np.int8).reshape(50, 3, 8), q)
    np.testing.assert_array_equal(raw[:, 24:].copy().view("<f4"), scale)


def test_cli_fold_and_verify(trained_run, capsys):
    from splitedge.cli import main

    out = trained_run / "cli-bundle"
    assert (
        main(
            [
                "llm",
                "fold",
                "--run",
                str(trained_run / "run"),
                "--out",
                str(out),
                "--dtype",
                "int8",
                "--val-tokens",
                "512",
                "--json",
            ]
        )
        == 0
    )
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["llm"]["table"]["dtype"] == "int8"
    assert main(["bundle", "verify", str(out)]) == 0
    assert main(["llm", "fold", "--run", str(trained_run / "nope"), "--out", str(out)]) == 2
    assert "splitedge llm train" in capsys.readouterr().err


def test_dense_run_folds_to_a_bundle_without_table(tmp_path):
    cfg = MeKiConfig(
        vocab_size=300, block_size=16, n_layer=1, n_head=2, d_model=16, ffn_hidden=32, meki="off"
    )
    build_run(tmp_path / "run", cfg, np.arange(100) % 300)
    manifest = fold_run(tmp_path / "run", tmp_path / "b", val_tokens=64)
    assert manifest["llm"]["table"] is None and "table.bin" not in manifest["files"]
    assert manifest["llm"]["decoder"]["inputs"][:2] == ["input_ids", "position_ids"]


def test_decoder_holds_the_embedding_once(trained_run):
    """Input lookup and output head read one V x d_model initializer (tied), not two copies."""
    import onnx
    from onnx import numpy_helper

    out = trained_run / "bundle-fp32"
    if not out.exists():
        fold_run(trained_run / "run", out, dtype="fp32", val_tokens=1024)
    graph = onnx.load(str(out / "decoder.onnx")).graph
    V, C = 512, 32
    big = [i for i in graph.initializer if sorted(i.dims) == sorted([V, C])]
    assert len(big) == 1 and list(big[0].dims) == [V, C]
    readers = [n.op_type for n in graph.node if big[0].name in n.input]
    assert sorted(readers) == ["Gather", "Gemm"]
    model, _ = load_checkpoint(trained_run / "run" / CKPT)
    np.testing.assert_array_equal(numpy_helper.to_array(big[0]), model.wte.weight.detach().numpy())
    decoder = json.loads((out / "manifest.json").read_text())["llm"]["decoder"]
    assert decoder["tied_embedding_bytes_saved"] == V * C * 4
