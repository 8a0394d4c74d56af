"""Turn a training run into an `llm` bundle: fold the memories, export the decoder, check both.

Bundle layout::

    manifest.json     kind "llm"; llm{config, tokenizer, eot_id, decoder, table, validation, training,
                      fold_check, health_probe (prompt ids + the bundle's own greedy ids)}
    decoder.onnx      KV-cached decoder step; MeKi rows are inputs, the table is not inside
    table.bin         folded MeKi table, token-major [V, L, d_mem] (absent for a dense model)
    tokenizer.json    byte-level BPE (tokenizers library)
    val_tokens.bin    uint16 validation tokens for on-device perplexity
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.meki.export import TABLE_DTYPES, export_decoder, write_table
from models.meki.model import MeKiGPT
from models.meki.train import CKPT, VAL_TOKENS, load_checkpoint
from splitedge import __version__
from splitedge.bundle import write_manifest


@torch.no_grad()
def fold_logit_diff(model: MeKiGPT, ids: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Max |logits(folded rows) - logits(training form)| on a (1, T) window.

    rows: the window's stored rows (L, T, d_mem); default the fp32 fold of the whole vocabulary.
    """
    if not model.cfg.has_memory:
        return 0.0
    x = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    if rows is None:
        memory = [r[None] for r in model.fold_tables()[x[0]].unbind(1)]  # (1, T, d_mem) per layer
    else:
        memory = [torch.from_numpy(np.ascontiguousarray(r))[None] for r in rows]
    ref, _, _ = model(x)
    got, _, _ = model(x, memory=memory)
    return float((got - ref).abs().max())


@torch.no_grad()
def torch_perplexity(model: MeKiGPT, tokens: np.ndarray) -> float:
    """Training-form perplexity over consecutive block-size windows (the reference for the bundle)."""
    from models.meki.train import evaluate

    return float(evaluate(model, tokens, tokens.size)["val_ppl"])


def fold_run(
    run_dir: Path,
    out: Path,
    dtype: str = "fp16",
    name: str | None = None,
    version: str = "1.0.0",
    val_tokens: int = 16384,
    dense_twin: Path | None = None,
    tie_embedding: bool = True,
) -> dict[str, Any]:
    """Build an llm bundle in `out` from run_dir (ckpt.pt, tokenizer.json, val_tokens.bin); its manifest.

    dense_twin: a dense bundle of the same shape; its figures (perplexity on this bundle's
    validation tokens, parameters, decoder bytes, training) are recorded as `llm.dense_twin`.
    tie_embedding=False stores the output head's own copy of the embedding (for comparisons).
    """
    if dtype not in TABLE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TABLE_DTYPES)}, got {dtype!r}")
    run_dir, out = Path(run_dir), Path(out)
    model, ckpt = load_checkpoint(run_dir / CKPT)
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("table.bin", "manifest.sig"):
        (out / stale).unlink(missing_ok=True)
    shutil.copyfile(run_dir / "tokenizer.json", out / "tokenizer.json")
    val = np.fromfile(run_dir / VAL_TOKENS, dtype=np.uint16)[: val_tokens + 1]
    val.tofile(out / "val_tokens.bin")
    t0 = time.perf_counter()
    table_entry = None
    if cfg.has_memory:
        table = model.fold_tables().numpy()  # (V, L, d_mem) fp32
        table_entry = write_table(table, out / "table.bin", TABLE_DTYPES[dtype])
    decoder = export_decoder(model, out / "decoder.onnx", tie=tie_embedding)
    fold_seconds = time.perf_counter() - t0
    result = ckpt["result"]
    manifest: dict[str, Any] = {
        "kind": "llm",
        "name": name or out.name,
        "version": version,
        "created": {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "training_command": result.get("command", "unknown"),
            "fold_command": _command(),
            "git_commit": _git_commit(),
            "splitedge_version": __version__,
        },
        "llm": {
            "config": cfg.to_dict(),
            "tokenizer": "tokenizer.json",
            "eot_id": int(result["data"]["eot_id"]),
            "decoder": decoder,
            "table": table_entry,
            "validation": {"tokens": "val_tokens.bin", "dtype": "uint16", "count": int(val.size)},
            "training": {
                k: result.get(k)
                for k in (
                    "steps",
                    "train_tokens_seen",
                    "train_seconds",
                    "val_loss",
                    "val_ppl",
                    "params",
                )
            },
        },
    }
    write_manifest(out, manifest)
    check = _check(model, out, val)
    manifest["llm"]["fold_check"] = {**check, "fold_seconds": round(fold_seconds, 2)}
    from edge.llm.probe import record_probe

    manifest["llm"]["health_probe"] = record_probe(out)  # what a device must reproduce
    if dense_twin is not None:
        manifest["llm"]["dense_twin"] = dense_twin_figures(Path(dense_twin), cfg.to_dict(), val)
        ppl, twin = check["val_ppl_bundle"], manifest["llm"]["dense_twin"]["val_ppl_bundle"]
        manifest["llm"]["dense_twin"]["val_ppl_change_pct_meki_vs_dense"] = round(
            100.0 * (ppl / twin - 1.0), 3
        )
    return write_manifest(out, manifest)


SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "ffn_hidden")


def dense_twin_figures(path: Path, config: dict[str, Any], val: np.ndarray) -> dict[str, Any]:
    """A dense bundle's figures next to a MeKi bundle of its shape, scored on the same tokens."""
    from edge.llm.runtime import LlmRuntime

    runtime = LlmRuntime(path, threads=1)
    try:
        twin = runtime.files.manifest
        if runtime.spec.has_memory:
            raise ValueError(f"dense twin {path} has a MeKi memory ({runtime.spec.meki!r})")
        other = {k: runtime.config.get(k) for k in SHAPE}
        if other != {k: config[k] for k in SHAPE}:
            raise ValueError(f"dense twin {path} has shape {other}, this model {config}")
        ppl = runtime.score(val)["val_ppl"]
        decoder_bytes = runtime.decoder_bytes
    finally:
        runtime.close()
    llm = twin["llm"]
    return {
        "name": twin["name"],
        "version": twin["version"],
        "val_ppl_bundle": ppl,  # on this bundle's validation tokens, as its own val_ppl_bundle
        "val_tokens": int(val.size),
        "decoder_bytes": decoder_bytes,
        "training": llm.get("training"),
        "training_command": twin.get("created", {}).get("training_command"),
        "files_sha256": twin["files"],
    }


def _check(model: MeKiGPT, out: Path, val: np.ndarray) -> dict[str, Any]:
    """Fold exactness (fp32 rows in torch) and the bundle's perplexity vs the training form."""
    from edge.llm.runtime import LlmRuntime

    window = val[: model.cfg.block_size].astype(np.int64)[None]
    runtime = LlmRuntime(out, threads=1)
    try:
        bundle_ppl = runtime.score(val)["val_ppl"]
        stored = (
            runtime.table.rows(window[0]) if runtime.table else None
        )  # as the device reads them
    finally:
        runtime.close()
    ref_ppl = torch_perplexity(model, val)
    return {
        "max_abs_logit_diff_fp32_fold": fold_logit_diff(model, window),
        "max_abs_logit_diff_stored_table": fold_logit_diff(model, window, stored),
        "val_ppl_training_form": ref_ppl,
        "val_ppl_bundle": bundle_ppl,
        "val_ppl_change_pct": 100.0 * (bundle_ppl / ref_ppl - 1.0),
    }


def _command() -> str:
    """This process's command line when run from the splitedge CLI."""
    if sys.argv and "splitedge" in sys.argv[0]:
        return " ".join(["splitedge", *sys.argv[1:]])
    return "python API (models.meki.fold.fold_run)"


def _git_commit() -> str:
    from models.export import _git_commit as commit

    return commit()


__all__ = ["CKPT", "fold_run", "fold_logit_diff", "torch_perplexity"]
