"""Side-by-side LLM bundle benchmark: one worker process per bundle, interleaved rounds.

Each bundle runs in its own spawned process (importing no torch), so RSS and table
residency are per bundle; the parent sends the same work to every worker in turn and
reverses the order every other round, so slow phases of a shared machine hit all alike.
The first round starts from a cold page cache (unless warm) and is where the table's
residency after `new_tokens` tokens is read; later rounds give the tokens/s medians.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitedge.errors import SplitedgeError


@dataclass
class BenchConfig:
    """What each bundle is asked to do."""

    rounds: int = 6  # round 0 is the cold warm-up; the medians use rounds 1..
    new_tokens: int = 256
    prompt_tokens: int = 64
    ppl_tokens: int = 16384
    threads: int = 1
    cold: bool = True
    cpu: int | None = None  # pin every worker to this CPU; None leaves placement to the kernel
    launches: int = 1  # fresh sets of worker processes, each running all rounds

    def __post_init__(self) -> None:
        if self.rounds < 2:
            raise ValueError(f"rounds must be >= 2 (round 0 is warm-up), got {self.rounds}")
        for name in ("new_tokens", "prompt_tokens", "ppl_tokens", "threads", "launches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cpu is not None and self.cpu not in allowed_cpus():
            raise ValueError(
                f"cpu {self.cpu} is not one this process may run on {sorted(allowed_cpus())}"
            )


def allowed_cpus() -> set[int]:
    """CPUs this process may run on (all of them where affinity is not supported)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def default_cpu() -> int | None:
    """The CPU the bench pins its workers to by default: the last allowed one, if affinity works.

    The workers take turns, so sharing one CPU costs them nothing, and it removes the
    core-to-core differences (a busy sibling thread, another tenant) that otherwise
    bias one worker against another for a whole run.
    """
    return max(allowed_cpus()) if hasattr(os, "sched_setaffinity") else None


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def optimized_ops(model: bytes, threads: int = 1) -> int:
    """Operators onnxruntime runs per step after its graph fusions (as the runtime's session)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.log_severity_level = 3  # the "hardware specific" warning on saving is expected
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return len(onnx.load(opts.optimized_model_filepath).graph.node)


def _worker(
    conn: Any, bundle: str, threads: int, cold: bool, cpu: int | None, inspect: bool
) -> None:
    """Serve ('gen' | 'score' | 'memory' | 'quit', payload) requests for one bundle.

    inspect: also count the optimised graph's operators (a second session; first launch only).
    """
    from edge.llm.runtime import LlmRuntime
    from edge.llm.sampling import Sampler

    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        rt = LlmRuntime(bundle, threads=threads)
        if cold and rt.table is not None:
            rt.table.drop_cache()
        if rt.spec.validation is None:
            raise SplitedgeError(f"{bundle} ships no validation tokens to score")
        val = np.frombuffer(rt.files.read(rt.spec.validation), dtype="<u2").copy()
        rss = _rss_bytes()
        ops = optimized_ops(rt.files.read(rt.spec.decoder), threads) if inspect else None
        conn.send(
            {
                "ok": True,
                "val_tokens": val,
                "rss_loaded": rss,
                "optimized_ops": ops,
                "decoder_bytes": rt.decoder_bytes,  # ~ the weights a step reads
            }
        )
    except Exception as e:  # report to the parent instead of dying silently
        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return
    while True:
        cmd, payload = conn.recv()
        if cmd == "gen":
            prompt, n, seed = payload
            gen = rt.generate_ids(prompt, n, Sampler(), seed=seed, stop_at_eot=False)
            conn.send(
                {
                    "prompt_tps": gen.prompt_tps,
                    "gen_tps": gen.gen_tps,
                    "gen_tps_cpu": gen.gen_tps_cpu,
                    "new_tokens": len(gen.ids),
                }
            )
        elif cmd == "score":
            conn.send(rt.score(payload))
        elif cmd == "memory":
            table = rt.table
            conn.send(
                {
                    "rss": _rss_bytes(),
                    "torch_imported": "torch" in sys.modules,
                    "table_bytes": table.size_bytes if table else 0,
                    "table_resident": table.resident_bytes() if table else 0,
                    "table_bytes_read": table.bytes_read if table else 0,
                }
            )
        else:
            rt.close()
            conn.send({"bye": True})
            return


def run_bench(bundles: list[str], cfg: BenchConfig) -> dict[str, Any]:
    """Benchmark bundles side by side; ratios are against the first dense bundle of the same shape.

    With launches > 1 the whole interleaved run repeats in fresh worker processes and the
    medians pool every launch's timed rounds: a process can be a few percent slower than
    its twin for its whole life (where its buffers landed), and one launch cannot tell that
    bias from a real difference.
    """
    from edge.llm.files import BundleFiles
    from edge.llm.spec import parse_llm_spec

    manifests = []
    for b in bundles:  # checked here so a bad bundle is one line, not a worker's failure
        files = BundleFiles(b)
        parse_llm_spec(files.manifest, b)
        manifests.append(files.manifest)
        files.close()
    launches = [_launch(bundles, manifests, cfg, first=k == 0) for k in range(cfg.launches)]
    return _summarise(bundles, manifests, launches, cfg)


def _launch(
    bundles: list[str], manifests: list[dict[str, Any]], cfg: BenchConfig, first: bool
) -> dict[str, Any]:
    """One set of worker processes running every round; the first also scores and reads memory."""
    ctx = mp.get_context("spawn")
    workers = []
    for b in bundles:
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_worker,
            args=(child, b, cfg.threads, cfg.cold and first, cfg.cpu, first),
            daemon=True,
        )
        proc.start()
        workers.append((parent, proc))
    try:
        return _measure(bundles, manifests, workers, cfg, first)
    finally:
        for parent, proc in workers:
            if proc.is_alive():
                try:
                    parent.send(("quit", None))
                    parent.recv()
                except (OSError, EOFError):
                    pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


SHAPE_KEYS = ("d_model", "n_layer", "n_head", "ffn_hidden", "vocab_size")


def baselines(manifests: list[dict[str, Any]]) -> list[int]:
    """Index each bundle is compared with: the first dense bundle of its shape, else bundle 0."""
    shapes = [tuple(m["llm"]["config"][k] for k in SHAPE_KEYS) for m in manifests]
    dense: dict[tuple[Any, ...], int] = {}
    for i, (shape, m) in enumerate(zip(shapes, manifests, strict=True)):
        if m["llm"]["config"]["meki"] == "off":
            dense.setdefault(shape, i)
    return [dense.get(shape, 0) for shape in shapes]


def _ask(worker: Any, cmd: str, payload: Any = None) -> dict[str, Any]:
    worker[0].send((cmd, payload))
    return _reply(worker)


def _reply(worker: Any) -> dict[str, Any]:
    try:
        return dict(worker[0].recv())
    except EOFError:  # the worker died without a word (killed, out of memory)
        code = worker[1].exitcode
        raise SplitedgeError(
            f"a bench worker exited unexpectedly (exit code {code}); "
            "check free memory, or bench fewer bundles at a time"
        ) from None


def _measure(
    bundles: list[str],
    manifests: list[dict[str, Any]],
    workers: list[Any],
    cfg: BenchConfig,
    first: bool,
) -> dict[str, Any]:
    hello = [_reply(w) for w in workers]
    for b, h in zip(bundles, hello, strict=True):
        if not h["ok"]:
            raise SplitedgeError(f"{b} failed to load in its worker: {h['error']}")
    same_tok = len({m["files"][m["llm"]["tokenizer"]] for m in manifests}) == 1
    # one shared validation text when the tokenizers agree, so perplexities are comparable
    val = [hello[0]["val_tokens"] if same_tok else h["val_tokens"] for h in hello]
    rounds: list[list[dict[str, Any]]] = []
    memory_after_first: list[dict[str, Any]] = [{} for _ in bundles]
    order = list(range(len(bundles)))
    for r in range(cfg.rounds):
        row: list[dict[str, Any]] = [{} for _ in bundles]
        start = (r * cfg.prompt_tokens) % max(1, val[0].size - cfg.prompt_tokens)
        for i in order if r % 2 == 0 else order[::-1]:
            prompt = val[i][start : start + cfg.prompt_tokens].astype(np.int64).tolist()
            row[i] = _ask(workers[i], "gen", (prompt, cfg.new_tokens, r))
            if r == 0 and first:
                memory_after_first[i] = _ask(workers[i], "memory")
        rounds.append(row)
    out: dict[str, Any] = {"timed": rounds[1:]}
    if first:  # what the summary reads once: load-time facts, memory, perplexity
        out["hello"], out["same_tokenizer"] = hello, same_tok
        out["memory_after_first"] = memory_after_first
        out["scores"] = [
            _ask(w, "score", v[: cfg.ppl_tokens + 1]) for w, v in zip(workers, val, strict=True)
        ]
        out["final_memory"] = [_ask(w, "memory") for w in workers]
    return out


def _summarise(
    bundles: list[str],
    manifests: list[dict[str, Any]],
    launches: list[dict[str, Any]],
    cfg: BenchConfig,
) -> dict[str, Any]:
    first = launches[0]
    hello, scores = first["hello"], first["scores"]
    memory_after_first, final_memory = first["memory_after_first"], first["final_memory"]
    same_tok = first["same_tokenizer"]
    timed = [row for launch in launches for row in launch["timed"]]
    results = []
    base_of = baselines(manifests)
    for i, (b, m) in enumerate(zip(bundles, manifests, strict=True)):
        llm = m["llm"]
        gen = [rd[i]["gen_tps"] for rd in timed]
        j = base_of[i]
        results.append(
            {
                "bundle": b,
                "name": m["name"],
                "meki": llm["config"]["meki"],
                "d_mem": llm["config"]["d_mem"] if llm["config"]["meki"] != "off" else 0,
                "table_dtype": llm["table"]["dtype"] if llm.get("table") else None,
                "shape": {k: llm["config"][k] for k in SHAPE_KEYS},
                "decoder_nodes": llm["decoder"].get("nodes"),
                "val_ppl": scores[i]["val_ppl"],
                "val_tokens": scores[i]["val_tokens"],
                "prompt_tps": statistics.median(rd[i]["prompt_tps"] for rd in timed),
                "gen_tps": statistics.median(gen),
                "gen_tps_min_max": [min(gen), max(gen)],
                "baseline": j,
                "gen_ratio": statistics.median(rd[i]["gen_tps"] / rd[j]["gen_tps"] for rd in timed),
                "gen_tps_cpu": statistics.median(rd[i]["gen_tps_cpu"] for rd in timed),
                "gen_ratio_cpu": statistics.median(
                    rd[i]["gen_tps_cpu"] / rd[j]["gen_tps_cpu"] if rd[j]["gen_tps_cpu"] else 0.0
                    for rd in timed
                ),
                "prompt_ratio": statistics.median(
                    rd[i]["prompt_tps"] / rd[j]["prompt_tps"] for rd in timed
                ),
                "rss_loaded": hello[i]["rss_loaded"],
                "optimized_ops": hello[i]["optimized_ops"],
                "decoder_bytes": hello[i]["decoder_bytes"],
                "decoder_sha256": m["files"].get(llm["decoder"]["onnx"]),
                "after_first_generation": memory_after_first[i],
                "after_all": final_memory[i],
                "fold_check": llm.get("fold_check"),
                "training": llm.get("training"),
                "created": m.get("created"),
            }
        )
    return {
        "config": asdict(cfg),
        "timed_rounds": len(timed),  # pooled over every launch
        "perplexity_comparable": same_tok,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": len(allowed_cpus()),
            "onnxruntime": _ort_version(),
        },
        "bundles": results,
    }


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def bundle_label(path: str) -> str:
    """Short label for tables: the bundle directory's name."""
    return Path(path).name
