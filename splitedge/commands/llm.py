"""`splitedge llm train|fold|generate|bench`: MeKi ROM-backed LMs from training to the device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError
from splitedge.output import emit, table

DEFAULT_DATA = Path("out/llm/data")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llm", help="train, fold, run and benchmark MeKi ROM-backed LLMs")
    lsub = p.add_subparsers(dest="llm_command", metavar="ACTION", required=True)
    _register_train(lsub)
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
        "--dense-twin",
        type=Path,
        default=None,
        help="a dense llm bundle of the same shape whose perplexity (on this bundle's "
        "validation tokens), size and training are recorded in the manifest (default: none)",
    )
    f.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    f.set_defaults(func=fold)
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
    g.set_defaults(func=generate)
    _register_bench(lsub)
    _register_startup(lsub)


def _register_train(lsub: argparse._SubParsersAction) -> None:
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
    t.set_defaults(func=train)


def _register_bench(lsub: argparse._SubParsersAction) -> None:
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
    b.set_defaults(func=bench)


def _register_startup(lsub: argparse._SubParsersAction) -> None:
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
    s.set_defaults(func=startup)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        return int(float(text[:-1]) * units[text[-1].upper()])
    except (KeyError, ValueError, IndexError):
        raise SplitedgeError(
            f"--size {text!r}: expected a number and K, M or G (e.g. 64M)"
        ) from None


def _training_imports() -> Any:
    try:
        from models.meki import train as train_mod
        from models.meki.model import MeKiConfig
    except ImportError as e:
        raise SplitedgeError(
            f"llm training needs torch and tokenizers ({e}); "
            "run `pip install -e .[train]` and `pip install tokenizers`"
        ) from e
    return train_mod, MeKiConfig


def train(args: argparse.Namespace) -> int:
    train_mod, MeKiConfig = _training_imports()
    from models.meki.data import DataConfig

    try:
        model = MeKiConfig(
            vocab_size=args.vocab,
            block_size=args.block_size,
            n_layer=args.layers,
            n_head=args.heads,
            d_model=args.d_model,
            ffn_hidden=args.ffn_hidden,
            meki=args.meki,
            d_mem=args.d_mem,
        )
        data = DataConfig(vocab_size=args.vocab, extra_files=[str(p) for p in args.text])
        cfg = train_mod.TrainConfig(
            model=model,
            data=data,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            threads=args.threads,
            warmup_steps=min(50, args.steps // 10),
        )
        result = train_mod.train(cfg, args.data, args.out, progress=not args.no_progress)
    except ValueError as e:
        raise SplitedgeError(str(e)) from e
    rows = [
        {"metric": k, "value": result[k]}
        for k in (
            "steps",
            "train_tokens_seen",
            "train_seconds",
            "final_train_loss",
            "val_loss",
            "val_ppl",
        )
    ]
    rows += [{"metric": f"params_{k}", "value": v} for k, v in result["params"].items()]
    emit(
        result,
        args.json,
        table(rows, title=f"trained {args.meki} (d_mem {args.d_mem}) -> {args.out}"),
    )
    return 0


def fold(args: argparse.Namespace) -> int:
    if not (args.run / "ckpt.pt").is_file():
        raise SplitedgeError(
            f"{args.run} has no ckpt.pt; train one with `splitedge llm train --out DIR`"
        )
    _training_imports()
    from models.meki.fold import fold_run

    try:
        manifest = fold_run(
            args.run,
            args.out,
            args.dtype,
            args.name,
            args.version,
            args.val_tokens,
            dense_twin=args.dense_twin,
        )
    except ValueError as e:
        raise SplitedgeError(str(e)) from e
    llm = manifest["llm"]
    rows = [{"file": k, "bytes": (args.out / k).stat().st_size} for k in manifest["files"]]
    check = [{"check": k, "value": v} for k, v in llm["fold_check"].items()]
    text = (
        table(rows, title=f"bundle {manifest['name']} {manifest['version']} -> {args.out}")
        + "\n\n"
        + table(check, title="fold check (table as stored vs training form)")
        + _probe_line(llm.get("health_probe"))
    )
    emit(manifest, args.json, text)
    return 0


def _probe_line(probe: dict[str, Any] | None) -> str:
    """One line on the recorded health probe (what `splitedge flash` checks on the device)."""
    if not probe:
        return ""
    return (
        f"\nhealth probe: {probe['prompt']!r} ({len(probe['prompt_ids'])} tokens) -> greedy ids "
        f"{probe['expected_ids']} (min top-2 logit margin {probe['min_logit_margin']:.3g})"
    )


def generate(args: argparse.Namespace) -> int:
    from edge.llm.runtime import Generation, LlmRuntime
    from edge.llm.sampling import Sampler

    try:
        sampler = Sampler(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy
        )
    except ValueError as e:
        raise SplitedgeError(
            str(e).replace("top_", "--top-").replace("temperature", "--temperature")
        ) from e
    for flag, value, lo in (
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--seed", args.seed, 0),
        ("--threads", args.threads, 1),
    ):
        if value < lo:
            raise SplitedgeError(f"{flag} must be an integer >= {lo}, got {value}")
    runtime = LlmRuntime(args.bundle, threads=args.threads)
    record = Generation(prompt_ids=[])
    pieces: list[str] = []
    try:
        # encodes now: a prompt that is not UTF-8 is refused before anything is written
        stream = runtime.stream(args.prompt, args.max_new_tokens, sampler, args.seed, record)
        for piece in stream:
            if not args.json:
                if not pieces:  # echo the prompt once the decoder has produced good logits
                    sys.stdout.write(args.prompt)
                sys.stdout.write(piece)
                sys.stdout.flush()
            pieces.append(piece)
    finally:
        runtime.close()
    stats = {
        "prompt_tokens": len(record.prompt_ids),
        "new_tokens": len(record.ids),
        "prompt_tokens_per_s": round(record.prompt_tps, 1),
        "gen_tokens_per_s": round(record.gen_tps, 1),
        "table_bytes_read": runtime.table.bytes_read if runtime.table else 0,
        "table_blocks_verified": runtime.table.blocks_verified if runtime.table else 0,
    }
    if args.json:
        emit({"prompt": args.prompt, "text": "".join(pieces), **stats}, True)
    else:
        if not pieces:
            sys.stdout.write(args.prompt)
        sys.stdout.write("\n")
        print(
            f"[{stats['new_tokens']} tokens, prompt {stats['prompt_tokens_per_s']} tok/s, "
            f"generation {stats['gen_tokens_per_s']} tok/s, table read "
            f"{stats['table_bytes_read']} B, {stats['table_blocks_verified']} table blocks "
            "verified]",
            file=sys.stderr,
        )
    return 0


def bench(args: argparse.Namespace) -> int:
    from edge.llm.bench import BenchConfig, default_cpu, run_bench
    from edge.llm.report import bench_table, render_markdown

    for b in args.bundle:
        if not b.exists():
            raise SplitedgeError(f"bundle {b} not found; build one with `splitedge llm fold`")
    try:
        cfg = BenchConfig(
            rounds=args.rounds,
            new_tokens=args.new_tokens,
            prompt_tokens=args.prompt_tokens,
            ppl_tokens=args.ppl_tokens,
            threads=args.threads,
            cold=not args.warm,
            cpu=default_cpu() if args.cpu is None else (None if args.cpu == -1 else args.cpu),
            launches=args.launches,
        )
    except ValueError as e:
        raise SplitedgeError(str(e)) from e
    result = run_bench([str(b) for b in args.bundle], cfg)
    command = (
        "splitedge " + " ".join(sys.argv[1:]) if sys.argv and "splitedge" in sys.argv[0] else None
    )
    result["command"] = command or "splitedge llm bench " + " ".join(
        f"--bundle {b}" for b in args.bundle
    )
    if args.report is not None:
        from edge.llm.startup import section

        args.report.parent.mkdir(parents=True, exist_ok=True)
        text = render_markdown(result)
        kept = section(args.report.read_text()) if args.report.is_file() else None
        args.report.write_text(text if kept is None else text.rstrip("\n") + "\n\n" + kept)
    emit(result, args.json, bench_table(result))
    return 0


def startup(args: argparse.Namespace) -> int:
    _training_imports()
    from edge.llm.startup import corrupt_block_check, measure, render, replace_section
    from models.meki.synthetic import synthetic_bundle

    sizes = [_size(t) for t in (args.size or ["64M", "512M", "2G"])]
    if args.new_tokens < 1 or args.repeat < 1:
        raise SplitedgeError("--new-tokens and --repeat must be integers >= 1")
    rows = []
    for size in sizes:
        out = args.dir / f"table-{size >> 20}M"
        try:
            synthetic_bundle(out, size)
        except ValueError as e:
            raise SplitedgeError(f"--size {size}: {e}") from e
        rows.append(measure(out, args.new_tokens, args.repeat))
    smallest = args.dir / f"table-{min(sizes) >> 20}M"
    blocks = -(-min(sizes) >> 20)
    corrupt = corrupt_block_check(smallest, blocks // 2) if blocks > 1 else None
    command = "splitedge " + " ".join(getattr(args, "argv", []) or ["llm", "startup"])
    result = {"command": command, "rows": rows, "corrupt_block": corrupt}
    text = render(rows, corrupt, command)
    if args.report is not None:
        old = args.report.read_text() if args.report.is_file() else ""
        args.report.write_text(replace_section(old, text))
    emit(result, args.json, text)
    return 0
