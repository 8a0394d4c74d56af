"""Argument parsers of `splitedge llm` (kept apart from the handlers in llm.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]
DEFAULT_DATA = Path("out/llm/data")


def add_llm_parser(sub: argparse._SubParsersAction, handlers: dict[str, Handler]) -> None:
    """The `llm` command's parser and its actions; handlers maps action name -> function."""
    p = sub.add_parser("llm", help="train, fold, run and benchmark MeKi ROM-backed LLMs")
    lsub = p.add_subparsers(dest="llm_command", metavar="ACTION", required=True)
    _register_train(lsub, handlers)
    f = lsub.add_parser(
        "fold",
        help="fold a run's memories into a table and build an llm bundle",
        description="Re-parameterise every layer's MeKi memory into one token-major "
        "[V, L, d_mem] table file, export the KV-cached decoder step to ONNX, and write "
        "an llm bundle; then check fold exactness and the bundle's perplexity.",
    )
    f.add_argument(
        "--run", type=Path, required=True, help="run directory from `splitedge llm train`"
    )
    f.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    f.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "int8"),
        default="fp16",
        help="table storage: fp16, or int8 with a float32 scale per row (default: %(default)s)",
    )
    f.add_argument(
        "--name", default=None, help="bundle name (default: the output directory's name)"
    )
    f.add_argument(
        "--version", default="1.0.0", help="bundle version for the manifest (default: %(default)s)"
    )
    f.add_argument(
        "--val-tokens",
        type=int,
        default=16384,
        help="validation tokens shipped for on-device perplexity (default: %(default)s)",
    )
    f.add_argument(
        "--untied-head",
        action="store_true",
        help="store the output head's own transposed copy of the embedding in decoder.onnx, "
        "as before the head was tied; for speed comparisons (default: one shared embedding)",
    )
    f.add_argument(
        "--dense-twin",
        type=Path,
        default=None,
        help="a dense llm bundle of the same shape whose perplexity (on this bundle's "
        "validation tokens), size and training are recorded in the manifest (default: none)",
    )
    f.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    f.set_defaults(func=handlers["fold"])
    g = lsub.add_parser("generate", help="stream text from an llm bundle (onnxruntime, no torch)")
    g.add_argument(
        "prompt",
        help="UTF-8 text to continue; an empty prompt starts a new document (generation "
        "begins after the end-of-text token); a prompt longer than the context keeps its end",
    )
    g.add_argument("--bundle", type=Path, required=True, help="llm bundle directory or .tar")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="tokens to generate after the prompt (default: %(default)s)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="0 = greedy, else 0.01 to 100 (default: %(default)s)",
    )
    g.add_argument(
        "--top-k", type=int, default=40, help="keep the k likeliest, 0 = off (default: %(default)s)"
    )
    g.add_argument(
        "--top-p", type=float, default=0.95, help="in (0, 1], 1 = off (default: %(default)s)"
    )
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, >= 0 (default: %(default)s)")
    g.add_argument(
        "--threads", type=int, default=1, help="onnxruntime threads, >= 1 (default: %(default)s)"
    )
    g.add_argument("--json", action="store_true", help="print text and timings as JSON at the end")
    g.set_defaults(func=handlers["generate"])
    _register_bench(lsub, handlers)
    _register_startup(lsub, handlers)


def _register_train(lsub: argparse._SubParsersAction, handlers: dict[str, Handler]) -> None:
    t = lsub.add_parser(
        "train",
        help="train a dense or MeKi LM on the offline corpus",
        description="Train a small decoder-only LM (RMSNorm, RoPE, SwiGLU) with a MeKi "
        "memory in every layer (or none: --meki off) on CPython's own documentation text "
        "plus any --text files. Needs the train extra (torch) and `tokenizers`.",
    )
    t.add_argument(
        "--out", type=Path, required=True, help="run directory (ckpt.pt, result.json, ...)"
    )
    t.add_argument(
        "--meki",
        choices=("off", "static", "dynamic", "both"),
        default="both",
        help="off = dense baseline; static/dynamic = ablations (default: %(default)s)",
    )
    t.add_argument("--d-mem", type=int, default=64, help="memory row width (default: %(default)s)")
    t.add_argument("--d-model", type=int, default=128, help="hidden width (default: %(default)s)")
    t.add_argument(
        "--layers", type=int, default=4, help="transformer layers (default: %(default)s)"
    )
    t.add_argument(
        "--heads", type=int, default=4, help="attention heads per layer (default: %(default)s)"
    )
    t.add_argument(
        "--ffn-hidden",
        type=int,
        default=352,
        help="SwiGLU hidden width, about 8/3 of --d-model (default: %(default)s)",
    )
    t.add_argument(
        "--block-size",
        type=int,
        default=256,
        help="training context in tokens; the runtime slides a window this long "
        "(default: %(default)s)",
    )
    t.add_argument(
        "--vocab", type=int, default=2048, help="BPE vocabulary size (default: %(default)s)"
    )
    t.add_argument("--steps", type=int, default=600, help="optimiser steps (default: %(default)s)")
    t.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="sequences of --block-size tokens per step (default: %(default)s)",
    )
    t.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="peak AdamW learning rate, after warm-up, cosine decay (default: %(default)s)",
    )
    t.add_argument(
        "--seed", type=int, default=0, help="seed for init and batches (default: %(default)s)"
    )
    t.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)"
    )
    t.add_argument(
        "--text",
        type=Path,
        action="append",
        default=[],
        help="extra UTF-8 text file for the corpus (repeatable)",
    )
    t.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="prepared tokenizer + token files, made here if missing (default: %(default)s)",
    )
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    t.set_defaults(func=handlers["train"])


def _register_bench(lsub: argparse._SubParsersAction, handlers: dict[str, Handler]) -> None:
    b = lsub.add_parser(
        "bench",
        help="side-by-side tokens/s, perplexity, RSS and table reads",
        description="Run each bundle in its own process (no torch) and interleave them "
        "round by round: prompt and generation tokens/s at batch 1, validation "
        "perplexity on the first bundle's tokens, RSS, table bytes read and resident. "
        "Ratios are against the first bundle (put the dense baseline first).",
    )
    b.add_argument(
        "--bundle", type=Path, action="append", required=True, help="llm bundle (repeat)"
    )
    b.add_argument(
        "--rounds", type=int, default=6, help="interleaved rounds (default: %(default)s)"
    )
    b.add_argument(
        "--new-tokens", type=int, default=256, help="generated per round (default: %(default)s)"
    )
    b.add_argument(
        "--prompt-tokens", type=int, default=64, help="prompt length (default: %(default)s)"
    )
    b.add_argument(
        "--ppl-tokens",
        type=int,
        default=16384,
        help="validation tokens scored per bundle (default: %(default)s)",
    )
    b.add_argument(
        "--threads", type=int, default=1, help="onnxruntime threads each (default: %(default)s)"
    )
    b.add_argument(
        "--warm",
        action="store_true",
        help="leave table pages in the page cache (default: evict first, a cold-flash start)",
    )
    b.add_argument(
        "--launches",
        type=int,
        default=1,
        help="repeat the whole run in this many fresh sets of worker processes and pool their "
        "rounds, so no one process's lifelong bias decides a ratio (default: %(default)s)",
    )
    b.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="pin every worker to this CPU; they take turns, so one CPU removes core-to-core "
        "bias between them (default: the last CPU this process may use; -1: no pinning)",
    )
    b.add_argument("--report", type=Path, default=None, help="also write this markdown report")
    b.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    b.set_defaults(func=handlers["bench"])


def _register_startup(lsub: argparse._SubParsersAction, handlers: dict[str, Handler]) -> None:
    s = lsub.add_parser(
        "startup",
        help="start-up time, bytes read and resident table pages against table size",
        description="Build synthetic llm bundles (random small decoder, sparse zero fp16 "
        "table of each --size) and open each cold in a fresh process: time, /proc/self/io "
        "bytes and resident table pages, next to the old whole-file-hash start; then flip a "
        "byte in one table block and show it refused on first read. Needs torch (train extra).",
    )
    s.add_argument(
        "--size",
        action="append",
        default=None,
        help="table size with a K/M/G suffix, repeatable (default: 64M, 512M and 2G)",
    )
    s.add_argument(
        "--dir",
        type=Path,
        default=Path("out/llm/startup"),
        help="where the synthetic bundles are written (default: %(default)s)",
    )
    s.add_argument(
        "--new-tokens",
        type=int,
        default=16,
        help="greedy tokens generated after a 16-token prompt (default: %(default)s)",
    )
    s.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="fresh processes per bundle and way of opening; times are medians "
        "(default: %(default)s)",
    )
    s.add_argument(
        "--report", type=Path, default=None, help="also write the start-up section of this markdown"
    )
    s.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    s.set_defaults(func=handlers["startup"])
