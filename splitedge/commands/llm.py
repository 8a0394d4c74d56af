"""`splitedge llm train|fold|generate|bench`: MeKi ROM-backed LMs from training to the device."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from splitedge.errors import SplitedgeError
from splitedge.output import emit, table


def register(sub: argparse._SubParsersAction) -> None:
    from splitedge.commands._llm_args import add_llm_parser

    handlers = {"train": train, "fold": fold, "generate": generate, "bench": bench}
    add_llm_parser(sub, {**handlers, "startup": startup})


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
            tie_embedding=not args.untied_head,
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
        from edge.llm.startup import marked_sections

        args.report.parent.mkdir(parents=True, exist_ok=True)
        kept = marked_sections(args.report.read_text()) if args.report.is_file() else []
        text = "\n".join([render_markdown(result).rstrip("\n") + "\n", *kept])
        args.report.write_text(text)
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
