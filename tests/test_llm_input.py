"""Sampler settings, CLI flags and prompts that make no sense are refused in one line, up front."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.llm.sampling import Sampler
from models.meki.fold import fold_run
from models.meki.model import MeKiConfig
from splitedge.bundle import write_manifest
from splitedge.cli import main
from splitedge.errors import SplitedgeError
from tests.test_llm_runtime import SMALL
from tests.test_meki_fold import build_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llm-input")
    val = np.random.default_rng(0).integers(1, SMALL["vocab_size"], size=200)
    build_run(root / "run", MeKiConfig(meki="both", **SMALL), val)
    fold_run(root / "run", root / "b", dtype="fp16", val_tokens=100)
    return root / "b"


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(temperature=float("-inf")),
        dict(temperature=1e-320),  # denormal: logits / t overflow to inf
        dict(temperature=-1.0),
        dict(temperature=1e-3),
        dict(temperature=1e3),
        dict(top_p=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=float("inf")),
        dict(top_k=-1),
        dict(top_k=2.5),
    ],
)
def test_sampler_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        Sampler(**bad)  # type: ignore[arg-type]


def test_sampler_accepts_the_edges_of_its_ranges():
    for ok in (dict(temperature=0.0), dict(temperature=0.01), dict(temperature=100.0)):
        Sampler(**ok)  # type: ignore[arg-type]
    Sampler(top_p=1.0, top_k=0)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["llm", "generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "flags",
    [
        ["--temperature", "nan"],
        ["--temperature", "inf"],
        ["--temperature", "1e-320"],
        ["--temperature", "-0.5"],
        ["--top-p", "0"],
        ["--top-p", "1.5"],
        ["--top-p", "nan"],
        ["--top-k", "-1"],
        ["--seed", "-1"],
        ["--threads", "0"],
        ["--threads", "-1"],
        ["--max-new-tokens", "0"],
    ],
)
def test_cli_refuses_bad_flags_in_one_line(bundle, flags, capsys):
    rc, out, err = _cli(["--bundle", str(bundle), *flags, "Hello"], capsys)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitedge: error: "), err
    assert flags[0] in err  # names the flag


def test_a_prompt_that_is_not_utf8_is_refused_before_any_output(bundle, capsys):
    # what Python makes of argv bytes that are not UTF-8 (surrogateescape)
    rc, out, err = _cli(["--bundle", str(bundle), "caf\udce9 au lait"], capsys)
    assert rc == 2 and out == "" and "not valid UTF-8" in err
    assert len(err.strip().splitlines()) == 1


def test_invalid_utf8_argv_bytes_from_a_shell(bundle):
    done = subprocess.run(
        [sys.executable, "-m", "splitedge", "llm", "generate", "--bundle", str(bundle)]
        + [b"caf\xe9"],  # type: ignore[list-item]
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    assert done.returncode == 2 and done.stdout == b"", done.stderr
    assert done.stderr.decode().strip().count("\n") == 0 and b"UTF-8" in done.stderr


def test_the_empty_prompt_starts_after_end_of_text(bundle, capsys):
    from edge.llm.runtime import LlmRuntime

    rc, out, err = _cli(
        ["--bundle", str(bundle), "--json", "--greedy", "--max-new-tokens", "5", ""], capsys
    )
    assert rc == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == 1 and result["prompt"] == ""
    rt = LlmRuntime(bundle)
    eot = rt.eot_id
    # reference: the same decode asked for explicitly from the end-of-text token
    want = rt.generate_ids([eot], 5, Sampler(greedy=True), stop_at_eot=False)
    got = rt.generate_ids([], 5, Sampler(greedy=True), stop_at_eot=False)
    assert got.prompt_ids == [eot] and got.ids == want.ids
    with pytest.raises(SplitedgeError, match="seed"):
        rt.generate_ids([eot], 2, seed=-1)
    rt.close()
    with pytest.raises(SplitedgeError, match="threads"):
        LlmRuntime(bundle, threads=0)


def test_non_finite_logits_are_an_error_not_text(bundle, tmp_path, capsys):
    """A NaN table whose hashes match (so integrity checks pass): the decoder's logits say so."""
    bad = tmp_path / "nan"
    shutil.copytree(bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    np.full((SMALL["vocab_size"], SMALL["n_layer"], SMALL["d_mem"]), np.nan, "<f2").tofile(
        bad / "table.bin"
    )
    from edge.llm.table import block_digests

    manifest["llm"]["table"]["blocks"]["sha256"] = block_digests(bad / "table.bin")
    for key in ("format", "files"):
        manifest.pop(key)
    write_manifest(bad, manifest)
    for extra in ([], ["--json"]):
        rc, out, err = _cli(["--bundle", str(bad), *extra, "Hello"], capsys)
        assert rc == 2 and out == "" and "non-finite logits" in err
        assert len(err.strip().splitlines()) == 1
