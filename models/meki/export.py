"""Fold a trained MeKi LM into a token-major table and export its decoder step to ONNX.

The table file holds one record per token, `[L, d_mem]` rows for every layer back to back,
so fetching a token's memory is one contiguous read:

- float32 / float16: record = the rows in that dtype;
- int8: record = int8 rows, then one float32 scale per row (symmetric, max-abs / 127).

The ONNX graph takes the token's rows as the inputs `memory_rows_<layer>`; the table is never
inside the graph, so the device's RAM holds only the dense-sized weights. The manifest entry
lists one sha256 per 1 MiB block of the table, which the device checks on first read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge.llm.spec import BLOCK_BYTES, io_names, record_dtype
from edge.llm.table import block_digests
from models.meki.model import MeKiGPT

OPSET = 17
TABLE_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of the last axis: (q int8, scale float32) with table ~= q * scale."""
    scale = np.abs(table).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def write_table(table: np.ndarray, path: Path, dtype: str) -> dict[str, Any]:
    """Write a (V, L, d_mem) float table as `dtype` records; return its manifest entry."""
    if dtype not in TABLE_DTYPES.values():
        raise ValueError(
            f"table dtype must be one of {sorted(TABLE_DTYPES.values())}, got {dtype!r}"
        )
    V, L, D = table.shape
    rec = record_dtype(dtype, L, D)
    out = np.empty(V, dtype=rec)
    if dtype == "int8":
        out["q"], out["scale"] = quantize_rows(table)
    else:
        out[...] = table.astype(rec.base)
    out.tofile(path)
    entry: dict[str, Any] = {
        "file": path.name,
        "dtype": dtype,
        "layout": "token-major",
        "shape": [V, L, D],
        "record_bytes": rec.itemsize,
    }
    if dtype == "int8":
        entry["scale"] = {"dtype": "float32", "per": "row", "offset_in_record": L * D}
    # one digest per block: the device verifies a block when it first reads from it
    entry["blocks"] = {"bytes": BLOCK_BYTES, "sha256": block_digests(path, BLOCK_BYTES)}
    return entry


class DecoderStep(nn.Module):
    """(ids, positions, [memory_rows], past k/v per layer) -> (logits, present k/v per layer)."""

    def __init__(self, model: MeKiGPT):
        super().__init__()
        self.model = model
        self.has_memory = model.cfg.has_memory

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor
    ) -> tuple:
        L = self.model.cfg.n_layer
        memory = None
        if self.has_memory:  # one (B, T, d_mem) input per layer: no slicing ops in the graph
            memory, rest = list(rest[:L]), rest[L:]
        past = [(rest[2 * i], rest[2 * i + 1]) for i in range(self.model.cfg.n_layer)]
        logits, _, presents = self.model(
            input_ids, memory=memory, past=past, position_ids=position_ids
        )
        return (logits, *(t for kv in presents for t in kv))


def merge_add_chains(graph: Any) -> int:
    """Rewrite Add(Add(a, b), c) as one Sum(a, b, c) where the inner sum has no other reader.

    This is the MeKi residual `x + FFN(h) + y`: onnxruntime's CPU Sum adds its inputs in
    order into one buffer, so the result is bit-identical and the step runs one operator
    fewer per layer. Returns how many Adds were folded away.
    """
    from onnx import NodeProto, helper

    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    nodes = []
    for node in graph.node:  # detached copies: the repeated field is rebuilt below
        nodes.append(NodeProto())
        nodes[-1].CopyFrom(node)
    by_output = {n.output[0]: i for i, n in enumerate(nodes) if n.op_type in ("Add", "Sum")}
    dropped: set[int] = set()
    for i, node in enumerate(nodes):
        j = by_output.get(node.input[0]) if node.op_type == "Add" else None
        if j is None or j in dropped or readers[nodes[j].output[0]] != 1:
            continue
        if nodes[j].output[0] in outputs:
            continue
        nodes[i] = helper.make_node(
            "Sum",
            [*nodes[j].input, node.input[1]],
            list(node.output),
            name=f"{node.name or node.output[0]}/Sum",
        )
        by_output[node.output[0]] = i
        dropped.add(j)
    del graph.node[:]
    graph.node.extend(n for i, n in enumerate(nodes) if i not in dropped)
    return len(dropped)


def tie_output_head(graph: Any) -> int:
    """Serve the output head from the token embedding's own initializer; bytes of weights dropped.

    torch exports the tied head `h @ E^T` with a second, transposed copy of E (V x d_model
    floats, about a fifth of a d128 decoder). Here that MatMul becomes Gemm(h, E, transB=1)
    on the embedding the input Gather already reads (the same dot products, E read row by
    row), with Reshapes around it because Gemm is 2-D. 0 when the graph has no such copy.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    tables = {
        n.input[0]: numpy_helper.to_array(inits[n.input[0]])
        for n in graph.node
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
    }
    for pos, head in enumerate(graph.node):
        if head.op_type != "MatMul" or head.input[1] not in inits or readers[head.input[1]] != 1:
            continue
        W = numpy_helper.to_array(inits[head.input[1]])
        E_name = next((k for k, E in tables.items() if np.array_equal(W, E.T)), None)
        if E_name is None:
            continue
        V, C = tables[E_name].shape
        x, out, p = head.input[0], head.output[0], "tied_head/"
        consts = {
            p + "flat": np.array([-1, C], np.int64),
            p + "zero": np.array([0], np.int64),
            p + "minus1": np.array([-1], np.int64),
            p + "vocab": np.array([V], np.int64),
        }
        graph.initializer.remove(inits[head.input[1]])
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        nodes = [
            helper.make_node("Reshape", [x, p + "flat"], [p + "x2d"]),  # (B*T, C)
            helper.make_node("Gemm", [p + "x2d", E_name], [p + "logits2d"], transB=1),
            helper.make_node("Shape", [x], [p + "shape"]),  # (B, T, C) -> (B, T, V)
            helper.make_node("Slice", [p + "shape", p + "zero", p + "minus1"], [p + "bt"]),
            helper.make_node("Concat", [p + "bt", p + "vocab"], [p + "out_shape"], axis=0),
            helper.make_node("Reshape", [p + "logits2d", p + "out_shape"], [out]),
        ]
        graph.node.remove(head)
        for k, node in enumerate(nodes):
            graph.node.insert(pos + k, node)
        return int(W.nbytes)
    return 0


def export_decoder(model: MeKiGPT, path: Path, tie: bool = True) -> dict[str, Any]:
    """Export the KV-cached decoder step (any number of new tokens) to ONNX; return its spec.

    tie=False keeps torch's separate transposed copy of the embedding for the output head
    (how decoders were exported before), for side-by-side comparisons.
    """
    cfg = model.cfg
    model.eval()
    inputs, outputs = io_names(cfg.n_layer, cfg.has_memory)
    T, P = 3, 2  # example sizes; both are dynamic axes
    example: list[torch.Tensor] = [
        torch.zeros(1, T, dtype=torch.long),
        torch.arange(P, P + T)[None],
    ]
    if cfg.has_memory:
        example += [torch.zeros(1, T, cfg.d_mem) for _ in range(cfg.n_layer)]
    example += [torch.zeros(1, cfg.n_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    for name in inputs + outputs:
        if name.startswith("memory_rows_"):
            axes[name] = {0: "batch", 1: "seq"}
        elif name.startswith("past_"):
            axes[name] = {0: "batch", 2: "past"}
        elif name.startswith("present_"):
            axes[name] = {0: "batch", 2: "total"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            DecoderStep(model),
            tuple(example),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    merged = merge_add_chains(graph.graph)
    tied = tie_output_head(graph.graph) if tie else 0
    if merged or tied:
        onnx.save(graph, str(path))
    nodes = len(graph.graph.node)
    return {
        "onnx": path.name,
        "opset": OPSET,
        "nodes": nodes,
        "add_chains_merged": merged,
        "tied_embedding_bytes_saved": tied,  # one V x d_model embedding, read by input and head
        "inputs": inputs,
        "outputs": outputs,
        "kv_shape": ["batch", cfg.n_head, "past", cfg.head_dim],
        "memory_rows_shape": ["batch", "seq", cfg.d_mem] if cfg.has_memory else None,
    }
