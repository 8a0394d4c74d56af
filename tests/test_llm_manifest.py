"""An llm manifest that disagrees with itself, its table or its decoder is refused in one line.

Each edit below is made to manifest.json alone (the files keep their hashes), so only the
cross-checks of edge.llm.spec can catch it: `splitedge llm generate` must exit 2 with one
line on stderr and print no text.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.meki.fold import fold_run
from models.meki.model import MeKiConfig
from splitedge.cli import main
from tests.test_llm_runtime import SMALL
from tests.test_meki_fold import build_run

V, L, D = SMALL["vocab_size"], SMALL["n_layer"], SMALL["d_mem"]
RECORD = L * D * 2  # fp16


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llm-manifest")
    val = np.random.default_rng(0).integers(1, V, size=200)
    build_run(root / "run", MeKiConfig(meki="both", **SMALL), val)
    fold_run(root / "run", root / "b", dtype="fp16", val_tokens=100)
    return root / "b"


def _table(m: dict[str, Any]) -> dict[str, Any]:
    return dict(m["llm"]["table"])


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit setting manifest[path] (dotted); value DELETE removes the key."""

    def edit(m: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        obj = m
        for key in parents:
            obj = obj[key]
        if value is DELETE:
            del obj[last]
        else:
            obj[last] = value(m) if callable(value) else value

    return edit


DELETE = object()
EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    # the table entry against itself, the config and the file's size
    "dtype fp32, record_bytes as fp32": lambda m: m["llm"]["table"].update(
        dtype="float32", record_bytes=L * D * 4
    ),
    "dtype fp32 only": _set("llm.table.dtype", "float32"),
    "dtype unknown": _set("llm.table.dtype", "bfloat16"),
    "dtype a number": _set("llm.table.dtype", 16),
    "dtype int8, no scale": lambda m: m["llm"]["table"].update(
        dtype="int8", record_bytes=L * D + 4 * L
    ),
    "shape V + 1": _set("llm.table.shape", [V + 1, L, D]),
    "shape L + 1": _set("llm.table.shape", [V, L + 1, D]),
    "shape two dims": _set("llm.table.shape", [V, L * D]),
    "shape a string": _set("llm.table.shape", f"{V}x{L}x{D}"),
    "shape negative": _set("llm.table.shape", [V, L, -D]),
    "record_bytes + 2": _set("llm.table.record_bytes", RECORD + 2),
    "record_bytes a string": _set("llm.table.record_bytes", str(RECORD)),
    "record_bytes missing": _set("llm.table.record_bytes", DELETE),
    "layout layer-major": _set("llm.table.layout", "layer-major"),
    "layout missing": _set("llm.table.layout", DELETE),
    "table missing": _set("llm.table", None),
    "table a list": _set("llm.table", lambda m: list(_table(m))),
    "table file unlisted": _set("llm.table.file", "nope.bin"),
    "block digests missing one": _set("llm.table.blocks.sha256", []),
    "block bytes zero": _set("llm.table.blocks.bytes", 0),
    # the model config against the table and the decoder graph
    "config vocab_size V + 1": _set("llm.config.vocab_size", V + 1),
    "config n_layer L + 1": _set("llm.config.n_layer", L + 1),
    "config d_mem doubled": _set("llm.config.d_mem", 2 * D),
    "config n_head not dividing": _set("llm.config.n_head", 3),
    "config n_head 4 (decoder has 2)": _set("llm.config.n_head", 4),
    "config d_model doubled": _set("llm.config.d_model", 2 * SMALL["d_model"]),
    "config meki off with a table": _set("llm.config.meki", "off"),
    "config meki unknown": _set("llm.config.meki", "maybe"),
    "config block_size missing": _set("llm.config.block_size", DELETE),
    "config block_size zero": _set("llm.config.block_size", 0),
    "config vocab_size a string": _set("llm.config.vocab_size", str(V)),
    "config n_layer a bool": _set("llm.config.n_layer", True),
    # the rest of the llm section
    "eot_id outside the vocabulary": _set("llm.eot_id", V),
    "eot_id missing": _set("llm.eot_id", DELETE),
    "eot_id a float": _set("llm.eot_id", 0.5),
    "decoder missing": _set("llm.decoder", DELETE),
    "decoder is the tokenizer": _set("llm.decoder.onnx", "tokenizer.json"),
    "decoder inputs one short": _set(
        "llm.decoder.inputs", lambda m: m["llm"]["decoder"]["inputs"][:-1]
    ),
    "tokenizer missing": _set("llm.tokenizer", DELETE),
    "llm a list": _set("llm", []),
    "files a list": _set("files", []),
}


def _generate(bundle: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["llm", "generate", "--bundle", str(bundle), "--max-new-tokens", "4", "Hello"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_unedited_bundle_generates(fp16_bundle: Path, capsys: pytest.CaptureFixture[str]):
    rc, out, err = _generate(fp16_bundle, capsys)
    assert rc == 0 and out.startswith("Hello"), err


def test_there_are_at_least_25_edits():
    assert len(EDITS) >= 25


@pytest.mark.parametrize("name", sorted(EDITS))
def test_a_manifest_edit_is_one_line_exit_2_no_text(
    name: str, fp16_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(fp16_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    EDITS[name](manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    rc, out, err = _generate(bundle, capsys)
    assert rc == 2, (name, err)
    assert out == "", (name, out)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitedge: error: "), (name, err)
    assert "Traceback" not in err


def test_a_table_file_of_the_wrong_size_is_refused(
    fp16_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(fp16_bundle, bundle)
    with open(bundle / "table.bin", "ab") as f:
        f.write(b"\0" * RECORD)  # one record too many: the manifest no longer describes it
    rc, out, err = _generate(bundle, capsys)
    assert rc == 2 and out == "" and f"is {(V + 1) * RECORD} bytes" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["[]", "{", '{"format": "splitedge-bundle/0"}'])
def test_a_manifest_that_is_not_ours_is_refused(
    text: str, fp16_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(fp16_bundle, bundle)
    (bundle / "manifest.json").write_text(text)
    rc, out, err = _generate(bundle, capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
