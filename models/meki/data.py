"""Offline corpus, byte-level BPE tokenizer and flat token files for the MeKi LMs.

The corpus is text every CPython install carries: the language-reference topics of
`pydoc_data.topics` and the docstrings of the standard library's modules (read with `ast`,
never imported), plus any text files the user names. Documents are split into train and
validation by a seeded shuffle; the tokenizer is trained on the train documents only.
Token ids are written once as flat uint16 files and memory-mapped for training.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

EOT = "<|endoftext|>"
# stdlib folders that are tests, GUIs or vendored code rather than documentation
_SKIP_TOP = {
    "test",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "__pycache__",
}


@dataclass
class DataConfig:
    """What goes into the corpus and how it is split and tokenised."""

    vocab_size: int = 2048
    val_fraction: float = 0.1
    seed: int = 1337
    pydoc_topics: bool = True
    stdlib_docstrings: bool = True
    extra_files: list[str] = field(default_factory=list)
    min_docstring_chars: int = 40

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 259 <= self.vocab_size <= 65535:  # 256 bytes + specials; ids stored as uint16
            raise ValueError(f"vocab_size must be in [259, 65535], got {self.vocab_size}")
        for f in self.extra_files:
            if not Path(f).is_file():
                raise ValueError(f"text file {f!r} not found")

    def digest(self) -> str:
        """Identity of the prepared data: config plus the sha256 of every extra file."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for f in self.extra_files:
            h.update(Path(f).read_bytes())
        return h.hexdigest()[:16]


def pydoc_documents() -> list[str]:
    """The language-reference topics shipped in pydoc_data (one document per topic)."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def stdlib_documents(min_chars: int = 40) -> list[str]:
    """One document per stdlib module: its module, class and function docstrings in order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] in _SKIP_TOP:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    parts.append(doc.strip())
        if parts:
            docs.append("\n\n".join(parts))
    return docs


def collect_documents(cfg: DataConfig) -> list[str]:
    """Every document of the corpus, in a fixed order."""
    docs: list[str] = []
    if cfg.pydoc_topics:
        docs += pydoc_documents()
    if cfg.stdlib_docstrings:
        docs += stdlib_documents(cfg.min_docstring_chars)
    for f in cfg.extra_files:  # a user file is split on blank-line runs into paragraphs groups
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in text.split("\n\n\n") if d.strip()]
    if not docs:
        raise ValueError(
            "the corpus is empty: enable pydoc topics/stdlib docstrings or name text files"
        )
    return docs


def split_documents(
    docs: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded shuffle of documents, then the first val_fraction (by count, at least 1) is validation."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def train_tokenizer(docs: Sequence[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on docs, with EOT as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(docs), trainer=trainer, length=len(docs))
    return tok


def encode_documents(tok: Any, docs: Sequence[str]) -> np.ndarray:
    """Token ids of the documents, each followed by EOT, as one flat uint16 array."""
    eot = tok.token_to_id(EOT)
    out: list[int] = []
    for enc in tok.encode_batch(list(docs)):
        out.extend(enc.ids)
        out.append(eot)
    return np.asarray(out, dtype=np.uint16)


def prepare(cfg: DataConfig, out_dir: Path) -> dict[str, Any]:
    """Write tokenizer.json, train.bin, val.bin and meta.json to out_dir (reused if up to date)."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    digest = cfg.digest()
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("digest") == digest and all(
            (out_dir / f).is_file() for f in ("tokenizer.json", "train.bin", "val.bin")
        ):
            return dict(meta)
    train_docs, val_docs = split_documents(collect_documents(cfg), cfg.val_fraction, cfg.seed)
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    train_ids, val_ids = encode_documents(tok, train_docs), encode_documents(tok, val_docs)
    train_ids.tofile(out_dir / "train.bin")
    val_ids.tofile(out_dir / "val.bin")
    meta = {
        "digest": digest,
        "config": asdict(cfg),
        "vocab_size": tok.get_vocab_size(),
        "eot_id": tok.token_to_id(EOT),
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "tokens": {"train": int(train_ids.size), "val": int(val_ids.size)},
        "chars": {"train": sum(map(len, train_docs)), "val": sum(map(len, val_docs))},
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_tokens(path: Path) -> np.ndarray:
    """A flat uint16 token file, memory-mapped read-only."""
    return np.memmap(path, dtype=np.uint16, mode="r")


def random_batches(
    tokens: np.ndarray, batch: int, block: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (x, y) int64 batches (batch, block) from random offsets; y is x shifted by one."""
    if tokens.size <= block + 1:
        raise ValueError(f"{tokens.size} tokens is too few for block_size={block}")
    while True:
        starts = rng.integers(0, tokens.size - block - 1, size=batch)
        x = np.stack([tokens[s : s + block] for s in starts]).astype(np.int64)
        y = np.stack([tokens[s + 1 : s + 1 + block] for s in starts]).astype(np.int64)
        yield x, y


def eval_windows(
    tokens: np.ndarray, block: int, limit: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive non-overlapping (x, y) windows (1, block) covering the first `limit` tokens."""
    n = tokens.size - 1 if limit is None else min(limit, tokens.size - 1)
    for s in range(0, n - block + 1, block):
        yield (
            np.asarray(tokens[s : s + block], dtype=np.int64)[None],
            np.asarray(tokens[s + 1 : s + 1 + block], dtype=np.int64)[None],
        )
