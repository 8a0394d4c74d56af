"""What an llm bundle's manifest must say, checked against itself, the table file and the decoder.

Every manifest field the runtime reads is checked here once, before anything is decoded: its
type, its range, and its agreement with the rest (the table's dtype, shape and record size
against the model config and the file's size; the decoder graph's inputs and outputs against
the config). A mismatch is one SplitedgeError line naming the field, the value found and what
to do, because a manifest that lies about its table (an fp16 file declared fp32) otherwise
decodes garbage and exits 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from splitedge.errors import SplitedgeError

TABLE_DTYPES = ("float32", "float16", "int8")
LAYOUTS = ("token-major",)  # one record per token id holding its [L, d_mem] rows
MEKI_MODES = ("off", "static", "dynamic", "both")
BLOCK_BYTES = 1 << 20  # the table's integrity unit: one sha256 per MiB, checked on first touch
REFOLD = "re-fold the bundle with `splitedge llm fold`"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def record_dtype(dtype: str, n_layer: int, d_mem: int) -> np.dtype:
    """numpy dtype of one token's record (little-endian, packed): rows, then int8's row scales."""
    if dtype == "int8":
        return np.dtype([("q", "i1", (n_layer, d_mem)), ("scale", "<f4", (n_layer,))])
    if dtype in ("float32", "float16"):
        return np.dtype((np.dtype(dtype).newbyteorder("<"), (n_layer, d_mem)))
    raise SplitedgeError(f"unknown table dtype {dtype!r}; {REFOLD}")


def io_names(n_layer: int, has_memory: bool) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder step graph."""
    inputs = ["input_ids", "position_ids"]
    inputs += [f"memory_rows_{i}" for i in range(n_layer)] if has_memory else []
    inputs += [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    outputs = ["logits"] + [
        f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")
    ]
    return inputs, outputs


@dataclass(frozen=True)
class TableSpec:
    """The folded table file as the manifest describes it (`llm.table`)."""

    file: str
    dtype: str
    shape: tuple[int, int, int]  # (V, L, d_mem)
    record_bytes: int
    block_bytes: int | None = None  # None: an old bundle without per-block digests
    block_sha256: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        return self.shape[0] * self.record_bytes


@dataclass(frozen=True)
class LlmSpec:
    """The checked `llm` section of a manifest: everything the runtime reads from it."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    d_model: int
    d_mem: int
    meki: str
    eot_id: int
    tokenizer: str
    decoder: str
    table: TableSpec | None
    validation: str | None

    @property
    def has_memory(self) -> bool:
        return self.meki != "off"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class _Reader:
    """Typed access to manifest fields; every failure names the field and says what to do."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, problem: str, fix: str = REFOLD) -> SplitedgeError:
        return SplitedgeError(f"{self.where}: manifest {field} {problem}; {fix}")

    def obj(self, obj: Any, key: str, field: str) -> dict[str, Any]:
        if not isinstance(obj, dict) or key not in obj:
            raise self.fail(field, "is missing")
        value = obj[key]
        if not isinstance(value, dict):
            raise self.fail(field, f"is {_show(value)}, expected an object")
        return value

    def num(self, obj: dict[str, Any], key: str, field: str, lo: int = 1) -> int:
        if key not in obj:
            raise self.fail(field, "is missing")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise self.fail(field, f"is {_show(value)}, expected an integer >= {lo}")
        return value

    def text(self, obj: dict[str, Any], key: str, field: str, choices: tuple[str, ...] = ()) -> str:
        if key not in obj:
            raise self.fail(field, "is missing")
        value = obj[key]
        if not isinstance(value, str) or not value or (choices and value not in choices):
            want = f"one of {', '.join(choices)}" if choices else "a non-empty string"
            raise self.fail(field, f"is {_show(value)}, expected {want}")
        return value

    def file(self, obj: dict[str, Any], key: str, field: str, files: dict[str, Any]) -> str:
        rel = self.text(obj, key, field)
        if rel not in files:
            raise self.fail(field, f"names {rel!r}, which is not among the bundle's files")
        return rel


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def parse_llm_spec(manifest: dict[str, Any], where: str) -> LlmSpec:
    """Check an llm manifest's fields and their agreement with one another; the checked spec."""
    r = _Reader(where)
    if manifest.get("kind") != "llm":
        raise SplitedgeError(
            f"bundle {where} is a {manifest.get('kind')!r} bundle, not an llm bundle"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise r.fail("files", f"is {_show(files)}, expected an object of path: sha256")
    llm = r.obj(manifest, "llm", "llm")
    cfg = r.obj(llm, "config", "llm.config")
    sizes = {
        k: r.num(cfg, k, f"llm.config.{k}", 2 if k in ("vocab_size", "block_size") else 1)
        for k in ("vocab_size", "block_size", "n_layer", "n_head", "d_model")
    }
    if sizes["d_model"] % sizes["n_head"] or (sizes["d_model"] // sizes["n_head"]) % 2:
        raise r.fail(
            "llm.config",
            f"has d_model {sizes['d_model']} and n_head {sizes['n_head']}, "
            "which do not split into heads of even width",
        )
    meki = r.text(cfg, "meki", "llm.config.meki", MEKI_MODES)
    d_mem = r.num(cfg, "d_mem", "llm.config.d_mem") if meki != "off" else 0
    eot = r.num(llm, "eot_id", "llm.eot_id", 0)
    if eot >= sizes["vocab_size"]:
        raise r.fail("llm.eot_id", f"is {eot}, outside the vocabulary [0, {sizes['vocab_size']})")
    decoder = r.obj(llm, "decoder", "llm.decoder")
    spec = LlmSpec(
        **sizes,
        d_mem=d_mem,
        meki=meki,
        eot_id=eot,
        tokenizer=r.file(llm, "tokenizer", "llm.tokenizer", files),
        decoder=r.file(decoder, "onnx", "llm.decoder.onnx", files),
        table=None,
        validation=None,
    )
    inputs, outputs = io_names(spec.n_layer, spec.has_memory)
    for key, want in (("inputs", inputs), ("outputs", outputs)):
        if key in decoder and decoder[key] != want:
            raise r.fail(
                f"llm.decoder.{key}",
                f"{_show(decoder[key])} disagree with llm.config "
                f"(n_layer {spec.n_layer}, meki {meki!r}), which needs {len(want)} {key}",
            )
    table = llm.get("table")
    if spec.has_memory and table is None:
        raise r.fail("llm.table", f"is missing, but llm.config.meki is {meki!r}")
    if not spec.has_memory and table is not None:
        raise r.fail("llm.table", "is present, but llm.config.meki is 'off' (a dense model)")
    validation = llm.get("validation")
    val_file = (
        r.file(validation, "tokens", "llm.validation.tokens", files)
        if isinstance(validation, dict)
        else None
    )
    parsed = parse_table(table, r, files, spec) if table is not None else None
    return replace(spec, table=parsed, validation=val_file)


def parse_table(
    table: Any, r: _Reader, files: dict[str, Any] | None, spec: LlmSpec | None
) -> TableSpec:
    """Check `llm.table` alone and, given the model spec, against its V, L and d_mem."""
    if not isinstance(table, dict):
        raise r.fail("llm.table", f"is {_show(table)}, expected an object")
    file = (
        r.file(table, "file", "llm.table.file", files)
        if files is not None
        else r.text(table, "file", "llm.table.file")
    )
    dtype = r.text(table, "dtype", "llm.table.dtype", TABLE_DTYPES)
    r.text(table, "layout", "llm.table.layout", LAYOUTS)
    shape = table.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)
    ):
        raise r.fail("llm.table.shape", f"is {_show(shape)}, expected [V, L, d_mem] of integers")
    V, L, D = shape
    if spec is not None and (V, L, D) != (spec.vocab_size, spec.n_layer, spec.d_mem):
        raise r.fail(
            "llm.table.shape",
            f"is {shape}, but llm.config has vocab_size {spec.vocab_size}, "
            f"n_layer {spec.n_layer}, d_mem {spec.d_mem}",
        )
    record = record_dtype(dtype, L, D)
    rb = r.num(table, "record_bytes", "llm.table.record_bytes")
    if rb != record.itemsize:
        raise r.fail(
            "llm.table.record_bytes",
            f"is {rb}, but a {dtype} record of {L} x {D} is {record.itemsize} bytes",
        )
    if dtype == "int8":
        scale = r.obj(table, "scale", "llm.table.scale")
        want = {"dtype": "float32", "per": "row", "offset_in_record": L * D}
        if {k: scale.get(k) for k in want} != want:
            raise r.fail("llm.table.scale", f"is {_show(scale)}, expected {want}")
    block_bytes, digests = None, ()
    if "blocks" in table:
        blocks = r.obj(table, "blocks", "llm.table.blocks")
        block_bytes = r.num(blocks, "bytes", "llm.table.blocks.bytes")
        listed = blocks.get("sha256")
        count = math.ceil(V * rb / block_bytes)
        if (
            not isinstance(listed, list)
            or len(listed) != count
            or not all(isinstance(d, str) and _HEX64.match(d) for d in listed)
        ):
            raise r.fail(
                "llm.table.blocks.sha256",
                f"is not a list of {count} hex sha256 digests (one per "
                f"{block_bytes}-byte block of a {V * rb}-byte table)",
            )
        digests = tuple(listed)
    return TableSpec(file, dtype, (V, L, D), rb, block_bytes, digests)


def table_spec(table: dict[str, Any], where: str) -> TableSpec:
    """A table entry checked on its own (no model config): for tools and tests."""
    return parse_table(table, _Reader(where), None, None)


def check_table_size(table: TableSpec, size: int, where: str) -> None:
    """Refuse a table file whose size is not V records of record_bytes each."""
    if size != table.size_bytes:
        V, L, D = table.shape
        raise SplitedgeError(
            f"{where}: {table.file} is {size} bytes, but manifest llm.table says {V} "
            f"{table.dtype} records of {L} x {D} ({table.record_bytes} bytes each) = "
            f"{table.size_bytes} bytes; the manifest does not describe this file: "
            "re-copy or re-fold the bundle"
        )


def check_decoder(spec: LlmSpec, session: Any, where: str) -> None:
    """Refuse a decoder graph whose inputs/outputs do not fit the manifest's config."""
    got_in = {i.name: i for i in session.get_inputs()}
    got_out = {o.name: o for o in session.get_outputs()}
    inputs, outputs = io_names(spec.n_layer, spec.has_memory)
    fix = "the decoder and the manifest do not belong together: re-fold the bundle"
    for kind, got, want in (("inputs", got_in, inputs), ("outputs", got_out, outputs)):
        if set(got) != set(want):
            extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
            raise SplitedgeError(
                f"{where}: {spec.decoder} {kind} differ from what llm.config (n_layer "
                f"{spec.n_layer}, meki {spec.meki!r}) needs (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); {fix}"
            )
    want_dims: dict[str, tuple[str, dict[int, int]]] = {
        "input_ids": ("tensor(int64)", {}),
        "position_ids": ("tensor(int64)", {}),
        "logits": ("tensor(float)", {-1: spec.vocab_size}),
    }
    for name in inputs + outputs:
        if name.startswith("memory_rows_"):
            want_dims[name] = ("tensor(float)", {-1: spec.d_mem})
        elif name.startswith(("past_", "present_")):
            want_dims[name] = ("tensor(float)", {1: spec.n_head, 3: spec.head_dim})
    for name, (dtype, dims) in want_dims.items():
        arg = got_in.get(name) or got_out[name]
        shape = list(arg.shape)
        bad = arg.type != dtype or any(
            len(shape) < 3 or (isinstance(shape[axis], int) and shape[axis] != size)
            for axis, size in dims.items()
        )
        if bad:
            need = ", ".join(f"axis {a} = {s}" for a, s in dims.items()) or "any shape"
            raise SplitedgeError(
                f"{where}: {spec.decoder} {name} is {arg.type} {shape}, but llm.config needs "
                f"{dtype} with {need}; {fix}"
            )
