"""Synthetic llm bundles with tables of any size, for measuring start-up against table size.

The model is a random-init MeKi LM (no training) whose decoder stays small while the table
grows: the vocabulary is fixed and the table's rows widen (d_mem). The table file is sparse
(all zeros, a valid fp16 table) unless `fill` asks for random rows, so a 2 GiB table costs no
disk; its block digests and sha256 are computed as for any bundle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.llm.spec import BLOCK_BYTES, record_dtype
from models.meki.export import export_decoder
from models.meki.model import MeKiConfig, MeKiGPT
from splitedge.bundle import FORMAT, MANIFEST, sha256_file

VOCAB = 16384
TOKENIZER_VOCAB = 300


def synthetic_config(table_bytes: int, vocab_size: int = VOCAB) -> MeKiConfig:
    """A one-layer d_model 16 model whose fp16 table is table_bytes (a multiple of 2 * V)."""
    d_mem, rest = divmod(table_bytes, 2 * vocab_size)
    if rest or d_mem < 1:
        raise ValueError(f"table_bytes must be a positive multiple of {2 * vocab_size}")
    return MeKiConfig(
        vocab_size=vocab_size,
        block_size=64,
        n_layer=1,
        n_head=2,
        d_model=16,
        ffn_hidden=32,
        d_mem=d_mem,
    )


def _zero_block_digests(size: int) -> tuple[list[str], str]:
    """Block digests and whole-file sha256 of `size` zero bytes, without reading a file."""
    zeros = bytes(BLOCK_BYTES)
    full = hashlib.sha256(zeros).hexdigest()
    whole = hashlib.sha256()
    digests = []
    for start in range(0, size, BLOCK_BYTES):
        n = min(BLOCK_BYTES, size - start)
        digests.append(full if n == BLOCK_BYTES else hashlib.sha256(zeros[:n]).hexdigest())
        whole.update(zeros[:n])
    return digests, whole.hexdigest()


def synthetic_bundle(out: Path, table_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Write an fp16 llm bundle with a sparse zero table of table_bytes to `out`; its manifest."""
    from models.meki.data import pydoc_documents, train_tokenizer

    cfg = synthetic_config(table_bytes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = MeKiGPT(cfg).eval()
    decoder = export_decoder(model, out / "decoder.onnx")
    train_tokenizer(pydoc_documents()[:20], TOKENIZER_VOCAB).save(str(out / "tokenizer.json"))
    rec = record_dtype("float16", cfg.n_layer, cfg.d_mem)
    with open(out / "table.bin", "wb") as f:
        f.truncate(cfg.vocab_size * rec.itemsize)  # sparse: zeros that take no disk
    digests, whole = _zero_block_digests(cfg.vocab_size * rec.itemsize)
    np.arange(1, 200, dtype=np.uint16).tofile(out / "val_tokens.bin")
    table = {
        "file": "table.bin",
        "dtype": "float16",
        "layout": "token-major",
        "shape": [cfg.vocab_size, cfg.n_layer, cfg.d_mem],
        "record_bytes": rec.itemsize,
        "blocks": {"bytes": BLOCK_BYTES, "sha256": digests},
    }
    manifest = {
        "kind": "llm",
        "name": out.name,
        "version": "0.0.0",
        "created": {"by": "models.meki.synthetic (random weights, zero table)"},
        "llm": {
            "config": cfg.to_dict(),
            "tokenizer": "tokenizer.json",
            "eot_id": 0,
            "decoder": decoder,
            "table": table,
            "validation": {"tokens": "val_tokens.bin", "dtype": "uint16", "count": 199},
        },
    }
    # the table's sha256 is known without reading 2 GiB of holes; the rest is hashed as usual
    files = {rel: sha256_file(out / rel) for rel in ("decoder.onnx", "tokenizer.json")}
    files.update({"table.bin": whole, "val_tokens.bin": sha256_file(out / "val_tokens.bin")})
    manifest = {"format": FORMAT, **manifest, "files": dict(sorted(files.items()))}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
