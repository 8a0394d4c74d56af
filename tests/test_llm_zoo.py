"""The shipped MeKi bundle (models/zoo/meki-d128) generates without torch, as folded.

References: the greedy ids and the perplexity its manifest recorded at fold time (the flash
health gate checks the same probe on a device), and its dense twin's perplexity on the same
validation tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo" / "meki-d128"
pytestmark = pytest.mark.skipif(not ZOO.is_dir(), reason="models/zoo/meki-d128 not present")


def _manifest() -> dict:
    return json.loads((ZOO / "manifest.json").read_text())


def test_zoo_bundle_is_intact_fp16_and_small():
    from splitedge.bundle import load_bundle, verify_files

    bundle = load_bundle(ZOO)
    assert not verify_files(bundle.root, bundle.manifest)
    llm = bundle.manifest["llm"]
    assert llm["table"]["dtype"] == "float16" and llm["config"]["meki"] == "both"
    assert sum(p.stat().st_size for p in ZOO.iterdir()) < 8 << 20


def test_generate_from_the_cli_without_torch():
    """`splitedge llm generate --bundle models/zoo/meki-d128 PROMPT`, greedy, in a fresh process."""
    probe = _manifest()["llm"]["health_probe"]
    n = len(probe["expected_ids"])
    code = (
        "import json, sys\n"
        "from splitedge.cli import main\n"
        f"rc = main(['llm', 'generate', '--bundle', {str(ZOO)!r}, '--greedy', "
        f"'--max-new-tokens', '{n}', '--json', {probe['prompt']!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["new_tokens"] >= 1 and result["text"].strip()
    from edge.llm.runtime import LlmRuntime

    rt = LlmRuntime(ZOO)
    # the text is the decode of the greedy ids the fold recorded (stopping at end-of-text)
    want = probe["expected_ids"]
    if rt.eot_id in want:
        want = want[: want.index(rt.eot_id) + 1]
    assert result["text"] == rt.decode(want)
    assert result["prompt_tokens"] == len(probe["prompt_ids"])
    rt.close()


def test_perplexity_is_what_the_fold_recorded_and_beats_the_dense_twin():
    from edge.llm.runtime import LlmRuntime

    llm = _manifest()["llm"]
    rt = LlmRuntime(ZOO)
    assert rt.spec.validation is not None
    val = np.frombuffer(rt.files.read(rt.spec.validation), dtype="<u2")
    ppl = rt.score(val)["val_ppl"]
    rt.close()
    assert ppl == pytest.approx(llm["fold_check"]["val_ppl_bundle"], rel=1e-5)
    twin = llm["dense_twin"]
    assert twin["val_tokens"] == val.size
    assert ppl < twin["val_ppl_bundle"]
