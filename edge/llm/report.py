"""Text table and markdown report of an `llm bench` result (plain data in, text out)."""

from __future__ import annotations

from typing import Any

from splitedge.output import table

SPEED_BAR = 0.97  # MeKi generation tokens/s must be at least this fraction of dense's


def _mb(n: int | None) -> float | str:
    return "n/a" if n is None else round(n / 2**20, 2)


def _kb(n: int | None) -> float | str:
    return "n/a" if n is None else round(n / 1024, 1)


def shape_label(b: dict[str, Any]) -> str:
    """d_model/layers/heads/FFN of a bundle, e.g. `d256 L4 H4 ffn704`."""
    s = b["shape"]
    return f"d{s['d_model']} L{s['n_layer']} H{s['n_head']} ffn{s['ffn_hidden']}"


def _base(result: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The bundle's speed and perplexity reference: the dense bundle of its shape (else the first)."""
    return dict(result["bundles"][b.get("baseline", 0)])


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary row per bundle; ratios and perplexity changes are against its shape's dense bundle."""
    out = []
    for b in result["bundles"]:
        base = _base(result, b)
        first = b["after_first_generation"]
        share = (
            (first["table_resident"] / first["table_bytes"]) if first.get("table_bytes") else None
        )
        out.append(
            {
                "bundle": b["name"],
                "shape": shape_label(b),
                "memory": "dense" if b["meki"] == "off" else f"{b['meki']} d_mem={b['d_mem']}",
                "table": b["table_dtype"] or "-",
                "val_ppl": round(b["val_ppl"], 2),
                "ppl_vs_dense": f"{100 * (b['val_ppl'] / base['val_ppl'] - 1):+.1f}%",
                "prompt_tok/s": round(b["prompt_tps"], 1),
                "gen_tok/s": round(b["gen_tps"], 1),
                "gen_ratio": f"{b['gen_ratio']:.3f}x",
                "rss_MB": _mb(b["after_all"]["rss"]),
                "table_MB": _mb(first.get("table_bytes", 0)),
                "table_read_KB": _kb(first.get("table_bytes_read", 0)),
                "table_resident_KB": _kb(first.get("table_resident")),
                "resident_share": "-" if share is None else f"{100 * share:.1f}%",
            }
        )
    return out


def bars(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two bars for every MeKi bundle against the dense bundle of the same shape."""
    out = []
    for b in result["bundles"]:
        base = _base(result, b)
        if b["meki"] == "off" or b["shape"] != base["shape"] or base["meki"] != "off":
            continue
        out.append(
            {
                "bundle": b["name"],
                "dense": base["name"],
                "ppl_lower_than_dense": b["val_ppl"] < base["val_ppl"]
                and result["perplexity_comparable"],
                "gen_ratio": round(b["gen_ratio"], 3),
                f"gen_ratio>={SPEED_BAR}": b["gen_ratio"] >= SPEED_BAR,
                "gen_ratio_cpu_time": round(b.get("gen_ratio_cpu", float("nan")), 3),
                # from the paired ratio (as the bar), not the two unpaired medians: a worker
                # process's lifelong speed bias cancels within a round but not across them
                "extra_us_per_token": round(1e6 / base["gen_tps"] * (1 / b["gen_ratio"] - 1), 1),
                "extra_graph_nodes": (b["decoder_nodes"] or 0) - (base["decoder_nodes"] or 0),
                "extra_ops_run": (b.get("optimized_ops") or 0) - (base.get("optimized_ops") or 0),
                "extra_weights": _extra_weights(b, base),
            }
        )
    return out


def _extra_weights(b: dict[str, Any], base: dict[str, Any]) -> str:
    """How much more the decoder's weights weigh than the dense one's (a step reads them all)."""
    if not b.get("decoder_bytes") or not base.get("decoder_bytes"):
        return "n/a"
    return f"{100 * (b['decoder_bytes'] / base['decoder_bytes'] - 1):+.1f}%"


def bench_table(result: dict[str, Any]) -> str:
    """The human table `splitedge llm bench` prints."""
    cfg = result["config"]
    title = (
        f"llm bench: {_timed_rounds(cfg)}, {cfg['prompt_tokens']} prompt + "
        f"{cfg['new_tokens']} new tokens, batch 1, {cfg['threads']} thread(s); ratios vs the dense bundle "
        "of the same shape"
    )
    text = table(rows(result), title=title)
    checks = bars(result)
    if checks:
        text += "\n\n" + table(
            checks, title="bars (each MeKi bundle vs the dense bundle of its shape)"
        )
    if not result["perplexity_comparable"]:
        text += "\n\nnote: the bundles' tokenizers differ, so their perplexities are not comparable"
    return text


def _md_table(data: list[dict[str, Any]]) -> str:
    if not data:
        return "(none)\n"
    cols = list(data[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in data]
    return "\n".join(lines) + "\n"


def _fold_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for b in result["bundles"]:
        fc, tr = b.get("fold_check") or {}, b.get("training") or {}
        out.append(
            {
                "bundle": b["name"],
                "steps": tr.get("steps"),
                "train_s": tr.get("train_seconds"),
                "params_inference": (tr.get("params") or {}).get("inference"),
                "params_folded_into_table": (tr.get("params") or {}).get("folded_away"),
                "table": b["table_dtype"] or "-",
                "max_logit_diff_fp32_fold": fc.get("max_abs_logit_diff_fp32_fold"),
                "max_logit_diff_stored": _g(fc.get("max_abs_logit_diff_stored_table")),
                "ppl_change_stored_vs_train_form": _pct(fc.get("val_ppl_change_pct")),
            }
        )
    return out


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2g}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}%"


def verdicts(result: dict[str, Any]) -> list[str]:
    """One plain sentence per bar and MeKi bundle, with the numbers behind it."""
    out = []
    by_name = {b["name"]: b for b in result["bundles"]}
    for c in bars(result):
        b, base = by_name[c["bundle"]], by_name[c["dense"]]
        first = b["after_first_generation"]
        ppl_ok = "lower: met" if c["ppl_lower_than_dense"] else "not lower: NOT met"
        speed_ok = "met" if c[f"gen_ratio>={SPEED_BAR}"] else "NOT met"
        out.append(
            f"- **{b['name']}** vs **{base['name']}** ({shape_label(b)}): validation perplexity {b['val_ppl']:.2f} vs "
            f"{base['val_ppl']:.2f} ({100 * (b['val_ppl'] / base['val_ppl'] - 1):+.1f}%, {ppl_ok}); "
            f"generation {b['gen_tps']:.0f} vs {base['gen_tps']:.0f} tokens/s, median ratio "
            f"{b['gen_ratio']:.3f} (bar >= {SPEED_BAR}: {speed_ok}; {c['extra_us_per_token']:+.1f} us "
            f"per token; per CPU-second ratio {c['gen_ratio_cpu_time']:.3f}); after {result['config']['new_tokens']} tokens from cold, "
            f"{_kb(first.get('table_resident'))} KB of its {_mb(first.get('table_bytes'))} MB table "
            f"was resident."
        )
    return out


def _speed_note(result: dict[str, Any]) -> list[str]:
    """Per shape: the dense step time, what the memory path adds, and whether the bar holds."""
    checks = bars(result)
    if not checks:
        return []
    by_name = {b["name"]: b for b in result["bundles"]}
    lines = [
        "What the memory path costs per decoded token: per layer a sigmoid, an add of the table row, "
        "the W_out matmul (d_mem x d_model) and the post RMSNorm, 4 operators; W_gate is fused into "
        "the FFN's input matmul and the residual `x + FFN + y` is one Sum, so the dense graph's "
        "operators are unchanged otherwise. At batch 1 a step reads every weight once, so W_gate and "
        "W_out (2 x d_model x d_mem floats per layer, extra_weights above) also cost about their share "
        "of the weight bytes once the model outgrows the CPU caches. The row fetch from the mapped "
        "table is about 1 us. Both costs shrink against a step as d_model grows relative to d_mem:",
        "",
    ]
    for shape in dict.fromkeys(c["dense"] for c in checks):
        group = [c for c in checks if c["dense"] == shape]
        base = by_name[shape]
        met = [c["bundle"] for c in group if c[f"gen_ratio>={SPEED_BAR}"]]
        lines.append(
            f"- {shape_label(base)}: a dense step takes about {1e6 / base['gen_tps']:.0f} us per token "
            f"including sampling; the MeKi bundles add {min(c['extra_us_per_token'] for c in group):+.0f} "
            f"to {max(c['extra_us_per_token'] for c in group):+.0f} us with "
            f"{', '.join(dict.fromkeys(c['extra_weights'] for c in group))} weights (ratios "
            f"{min(c['gen_ratio'] for c in group):.3f}-{max(c['gen_ratio'] for c in group):.3f}); "
            f"speed bar met by {', '.join(met) if met else 'none'}."
        )
    biggest = max(b["after_first_generation"].get("table_bytes", 0) for b in result["bundles"])
    return [
        *lines,
        *_noise_note(result),
        "",
        f"The residency shares above are for tables of at most {_mb(biggest)} MB ({biggest // 4096} pages), "
        "where a few hundred tokens touch a large share of the pages; tests/test_llm_runtime.py checks "
        "that a 64 MiB table stays under 5% resident after 256 sampled tokens from a cold start.",
        "",
    ]


def _timed_rounds(cfg: dict[str, Any]) -> str:
    """How many rounds the medians pool: each launch's round 0 is its warm-up."""
    n = cfg.get("launches", 1)
    per = f"{cfg['rounds'] - 1} timed rounds (+1 warm-up)"
    return (
        per
        if n == 1
        else f"{n} launches of fresh workers x {per} = {n * (cfg['rounds'] - 1)} rounds"
    )


def _noise_note(result: dict[str, Any]) -> list[str]:
    """A dense bundle benched against another dense bundle of its shape is an A/A check."""
    bundles = result["bundles"]
    out = []
    for i, b in enumerate(bundles):
        j = b.get("baseline", 0)
        base = bundles[j]
        if i != j and b["meki"] == base["meki"] == "off" and b["shape"] == base["shape"]:
            if b.get("decoder_sha256") != base.get("decoder_sha256"):
                out.append(
                    f"- {b['name']} is a dense bundle of {base['name']}'s shape with another "
                    f"decoder file ({b.get('decoder_bytes', 0)} vs "
                    f"{base.get('decoder_bytes', 0)} bytes) and ran at {b['gen_ratio']:.3f}x "
                    "its speed."
                )
                continue
            out.append(
                f"- A/A check: {b['name']} has the weights and graph of {base['name']} "
                f"and ran in its own workers at {b['gen_ratio']:.3f}x its speed, so ratios "
                f"this close to 1 are within this run's noise."
            )
    return out


def _pinning(cfg: dict[str, Any]) -> str:
    if cfg.get("cpu") is None:
        return "workers not pinned"
    return f"every worker pinned to CPU {cfg['cpu']} (they take turns)"


def render_markdown(result: dict[str, Any]) -> str:
    """docs/results/meki.md: what ran, the side-by-side table, the bars, the fold checks."""
    m, cfg = result["machine"], result["config"]
    checks = bars(result)
    lines = [
        "# MeKi ROM-backed LLM: dense vs MeKi, side by side",
        "",
        "Generated by this command (rerun it to refresh this file):",
        "",
        f"    {result['command']}",
        "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPU(s) visible, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}. Each bundle runs in its own process (no torch imported: "
        f"{not any(b['after_all']['torch_imported'] for b in result['bundles'])}), "
        f"{cfg['threads']} onnxruntime thread(s), batch 1, "
        f"{_pinning(cfg)}. Rounds are interleaved, the order reversed "
        f"every other round; the first round starts with the tables evicted from the page cache "
        f"({'cold' if cfg['cold'] else 'warm'}), and each launch's first round is a warm-up left out "
        f"of the tokens/s medians "
        f"({_timed_rounds(cfg)} of {cfg['prompt_tokens']} prompt + {cfg['new_tokens']} "
        f"sampled tokens). Ratios are the median of per-round ratios to the dense bundle of the same shape.",
        "",
        "## Results",
        "",
        _md_table(rows(result)),
        f"val_ppl: perplexity of the bundle as shipped (folded table, onnxruntime) on the first "
        f"{result['bundles'][0]['val_tokens']} validation tokens (held-out documents, seeded split). "
        "table_read_KB / table_resident_KB / resident_share: after the first "
        f"{cfg['new_tokens']}-token generation from a cold start — bytes of table records the runtime "
        "read, and the table mapping's Rss in /proc/self/smaps as a share of the file.",
        "",
        "## Bars",
        "",
        *verdicts(result),
        "",
        _md_table(checks),
        "extra_us_per_token = (1/gen_ratio - 1) x the dense step time: what the paired per-round "
        "ratio means per token (the median tok/s columns are unpaired, so their quotient can "
        "differ by a process's speed bias). gen_ratio (the bar) is "
        "wall-clock; gen_ratio_cpu_time is the same ratio per second of each worker's own CPU time, "
        "a cross-check that is blind to time the shared machine's other processes take. "
        "extra_graph_nodes = nodes added to the exported decoder graph by the memory path (before "
        "onnxruntime's fusions); extra_ops_run = operators added to what onnxruntime actually runs "
        "per step (after its fusions).",
        "",
        *_speed_note(result),
        "## Training and folding",
        "",
        "How each bundle was made (from its manifest):",
        "",
        *[
            f"- {b['name']}: `{(b.get('created') or {}).get('training_command', '?')}` then "
            f"`{(b.get('created') or {}).get('fold_command', '?')}`"
            for b in result["bundles"]
        ],
        "",
        _md_table(_fold_rows(result)),
        "train_s: wall-clock seconds of training on the machine as it was at the time (shared, so not "
        "comparable across rows). max_logit_diff_fp32_fold: folded fp32 table vs the training form (memories computed from "
        "M_l, G_l and E) on one validation window. ppl_change: perplexity of the bundle with the "
        "table as stored (onnxruntime) vs the training-form model in torch on the same tokens.",
        "",
    ]
    return "\n".join(lines)
