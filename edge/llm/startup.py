"""Start-up cost of an llm bundle against its table's size, each measured in a fresh process.

What a device pays before the first token: wall time of `LlmRuntime(bundle)`, the bytes that
process read meanwhile (/proc/self/io: `rchar` counts every read() byte, `read_bytes` what
came from storage) and the table pages resident in its mapping. Imports happen before the
clock starts. Side by side, the same bundle opened the way every start did before per-block
digests (`load_bundle(verify=True)`: every file hashed whole). Then a short generation shows
what first touches cost: blocks verified (1 MiB hashed each) and pages resident.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from splitedge.errors import SplitedgeError

SECTION = "startup"  # the marked section of docs/results/meki.md this module writes


def proc_io() -> dict[str, int]:
    """This process's I/O counters (/proc/self/io); empty where /proc is unavailable."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def evict_file(path: Path) -> None:
    """Drop a file's clean pages from the page cache (where posix_fadvise exists)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def evict(bundle: Path) -> None:
    """Drop every file of a bundle directory from the page cache (a cold start)."""
    for p in Path(bundle).iterdir():
        if p.is_file():
            evict_file(p)


def _open_new(bundle: str, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    from edge.llm.runtime import LlmRuntime
    from edge.llm.sampling import Sampler

    io0, t0 = proc_io(), time.perf_counter()
    rt = LlmRuntime(bundle)
    seconds, io1 = time.perf_counter() - t0, proc_io()
    table = rt.table
    assert table is not None
    from edge.llm.runtime import cpu_session

    # the decoder alone, again from cold: read, hash and session, the part that is model size
    path, _, _ = rt.files.locate(rt.spec.decoder)
    evict_file(path)
    t1 = time.perf_counter()
    cpu_session(rt.files.read(rt.spec.decoder), 1)
    session_s = time.perf_counter() - t1
    out = {
        "startup_s": seconds,
        "session_s": session_s,
        "manifest_bytes": len(json.dumps(rt.files.manifest)),
        "rchar": io1.get("rchar", 0) - io0.get("rchar", 0),
        "read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
        "table_hashed_at_start": table.bytes_hashed,
        "resident_at_start": table.resident_bytes(),
        "decoder_bytes": rt.decoder_bytes,
        "table_bytes": table.size_bytes,
        "blocks": table.blocks,
    }
    rt.generate_ids(prompt, new_tokens, Sampler(greedy=True), stop_at_eot=False)
    out.update(
        blocks_verified=table.blocks_verified,
        table_hashed=table.bytes_hashed,
        table_records_read=table.bytes_read,
        resident_after=table.resident_bytes(),
    )
    rt.close()
    return out


def _open_old(bundle: str) -> dict[str, Any]:
    from splitedge.bundle import load_bundle

    io0, t0 = proc_io(), time.perf_counter()
    load_bundle(bundle, verify=True)
    seconds, io1 = time.perf_counter() - t0, proc_io()
    return {"startup_s": seconds, "rchar": io1.get("rchar", 0) - io0.get("rchar", 0)}


def _read_token(bundle: str, token: int) -> dict[str, Any]:
    from edge.llm.runtime import LlmRuntime

    rt = LlmRuntime(bundle)
    try:
        rt.forward([token])
        return {"ok": True}
    except SplitedgeError as e:
        return {"ok": False, "error": str(e)}
    finally:
        rt.close()


def _child(conn: Any, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    try:
        conn.send(fn(*args))
    except Exception as e:  # reported by the parent in one line
        conn.send({"failed": f"{type(e).__name__}: {e}"})


def fresh(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn(*args) in a new spawned process (clean counters, nothing mapped or imported)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    try:
        result = dict(parent.recv())
    except EOFError:
        raise SplitedgeError(f"start-up worker died (exit code {proc.exitcode})") from None
    finally:
        proc.join(timeout=30)
    if "failed" in result:
        raise SplitedgeError(f"start-up worker failed: {result['failed']}")
    return result


def measure(bundle: Path, new_tokens: int = 16, repeat: int = 3, seed: int = 0) -> dict[str, Any]:
    """Cold starts of one bundle, new (lazy blocks) and old (whole-file hashes), interleaved;
    start-up seconds are medians over `repeat` fresh processes each."""
    from edge.llm.files import BundleFiles
    from edge.llm.spec import parse_llm_spec

    spec = parse_llm_spec(BundleFiles(bundle).manifest, str(bundle))
    prompt = np.random.default_rng(seed).integers(1, spec.vocab_size, 16).tolist()
    news, olds = [], []
    for _ in range(repeat):
        evict(bundle)
        news.append(fresh(_open_new, str(bundle), prompt, new_tokens))
        evict(bundle)
        olds.append(fresh(_open_old, str(bundle)))
    new, old = dict(news[0]), dict(olds[0])
    for runs, out in ((news, new), (olds, old)):
        for key in ("startup_s", "session_s"):
            if key in out:
                out[key] = statistics.median(r[key] for r in runs)
    return {"bundle": str(bundle), "new": new, "old": old, "repeat": repeat}


def corrupt_block_check(bundle: Path, block: int) -> dict[str, Any]:
    """Flip one byte inside `block` of the table, read a token there, restore the byte."""
    from edge.llm.files import BundleFiles
    from edge.llm.spec import parse_llm_spec

    spec = parse_llm_spec(BundleFiles(bundle).manifest, str(bundle))
    assert spec.table is not None and spec.table.block_bytes
    pos = block * spec.table.block_bytes + 7
    token = pos // spec.table.record_bytes
    path = Path(bundle) / spec.table.file
    with open(path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ 0xFF]))
    try:
        evict(bundle)
        other = fresh(_read_token, str(bundle), 0)  # block 0 is intact
        bad = fresh(_read_token, str(bundle), token)
    finally:
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(old)
    return {"block": block, "token": token, "intact_block_ok": other["ok"], **bad}


def render(rows: list[dict[str, Any]], corrupt: dict[str, Any] | None, command: str) -> str:
    """The start-up section of docs/results/meki.md."""
    mib = 1 << 20
    lines = [
        "## Start-up against table size",
        "",
        "Generated by this command (rerun it to refresh this section):",
        "",
        f"    {command}",
        "",
        "Synthetic bundles (random one-layer d_model 16 decoder, vocabulary 16384, sparse "
        "all-zero fp16 table; the table grows by widening its rows). Each start is a fresh "
        "process after the bundle's files were evicted from the page cache; bytes are "
        "/proc/self/io deltas over the open alone (imports done before the clock starts). "
        "`new` = LlmRuntime(bundle): manifest checks, decoder read once and hashed, table "
        "mapped, 1 MiB blocks verified on first touch. `old` = load_bundle(verify=True), "
        "what every start did before: each file hashed whole.",
        "",
        "| table | decoder | manifest | start new | decoder alone | start new - decoder "
        "| start old | new/old | rchar new | rchar new - decoder | rchar old | read_bytes new "
        "| table hashed at start | table resident at start "
        "| after 16+16 tokens: blocks verified | hashed | resident |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n, o = r["new"], r["old"]
        lines.append(
            f"| {n['table_bytes'] / mib:.0f} MiB | {n['decoder_bytes'] / mib:.2f} MiB "
            f"| {n['manifest_bytes'] / 1024:.0f} KiB "
            f"| {n['startup_s'] * 1e3:.0f} ms | {n['session_s'] * 1e3:.0f} ms "
            f"| {(n['startup_s'] - n['session_s']) * 1e3:.0f} ms "
            f"| {o['startup_s'] * 1e3:.0f} ms | {n['startup_s'] / o['startup_s']:.3f} "
            f"| {n['rchar'] / 1024:.0f} KiB | {(n['rchar'] - n['decoder_bytes']) / 1024:.0f} KiB "
            f"| {o['rchar'] / mib:.1f} MiB | {n['read_bytes'] / 1024:.0f} KiB "
            f"| {n['table_hashed_at_start']} B | {n['resident_at_start']} B "
            f"| {n['blocks_verified']} of {n['blocks']} | {n['table_hashed'] / mib:.0f} MiB "
            f"| {n['resident_after'] / 1024:.0f} KiB |"
        )
    lines += [
        "",
        "Start-up times are medians of "
        f"{rows[0]['repeat']} fresh processes per bundle, new and old interleaved. The "
        "synthetic decoder grows with the table (its W_gate/W_out are d_model x d_mem), so "
        "`decoder alone` (the same process evicts decoder.onnx and times reading, hashing and "
        "opening an onnxruntime session on it once more) and `rchar new - decoder` separate "
        "what the model's own size costs from what the table costs: the bytes read besides "
        "the decoder are the manifest (one 64-hex "
        "digest per MiB of table) and onnxruntime's and Python's own reads, and no table "
        "byte is hashed or resident at start. After start, each first touch of a block "
        "hashes it (one 1 MiB pread, then its other pages are dropped from the page cache), "
        "so the mapping's resident pages stay those of the records read.",
    ]
    if corrupt is not None:
        lines += [
            "",
            f"Corruption: one byte flipped in block {corrupt['block']} of the "
            f"{min(r['new']['table_bytes'] for r in rows) / mib:.0f} MiB table; a token in "
            "block 0 still "
            f"decodes ({corrupt['intact_block_ok']}), and reading token {corrupt['token']} "
            f"(in block {corrupt['block']}) is refused on first read:",
            "",
            f"    {corrupt.get('error', 'NOT DETECTED')}",
        ]
    return "\n".join(lines) + "\n"


def replace_section(text: str, body: str, name: str = SECTION) -> str:
    """text with the section between `<!-- name -->` markers replaced by body (appended if none)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{body}{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + block


def marked_sections(text: str) -> list[str]:
    """Every `<!-- name -->...<!-- /name -->` section of text, markers included, in order.

    `llm bench --report` regenerates a report but keeps these: sections other commands wrote.
    """
    import re

    return [
        m.group(0) + "\n"
        for m in re.finditer(r"<!-- ([\w-]+) -->\n.*?<!-- /\1 -->", text, flags=re.DOTALL)
    ]
