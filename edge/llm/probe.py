"""The llm bundle's health probe: a fixed prompt and the greedy tokens the bundle itself produced.

`splitedge llm fold` records it in the manifest (`llm.health_probe`) by decoding with this
module's `greedy_ids` through the same onnxruntime runtime a device uses; the flash health
gate decodes the same prompt ids on the device and requires the same ids. Table reads and the
decoder are deterministic on CPU, so ids are compared exactly; each step's top-1/top-2 logit
margin is recorded too, so a mismatch can be told apart from a near tie. Bundles folded
before probes existed get a weaker check: one forward step that must give finite logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.llm.runtime import LlmRuntime
from splitedge.bundle import Bundle, load_bundle

PROBE_PROMPT = "Return the value of"
PROBE_TOKENS = 8


def greedy_ids(
    runtime: LlmRuntime, prompt_ids: Sequence[int], n: int
) -> tuple[list[int], list[float]]:
    """n greedy next ids after prompt_ids (no stop at end-of-text) and each step's logit margin."""
    runtime.reset()
    logits = runtime.forward(list(prompt_ids))[-1]
    ids, margins = [], []
    for i in range(n):
        top2 = np.partition(np.asarray(logits, dtype=np.float64), -2)[-2:]
        ids.append(int(np.argmax(logits)))
        margins.append(float(top2[1] - top2[0]))
        if i < n - 1:
            logits = runtime.forward([ids[-1]])[-1]
    return ids, margins


def record_probe(
    bundle: Bundle | str | Path, prompt: str = PROBE_PROMPT, n: int = PROBE_TOKENS
) -> dict[str, Any]:
    """The manifest's `llm.health_probe`: prompt, its ids, and the bundle's own greedy ids."""
    runtime = LlmRuntime(bundle, threads=1)
    try:
        prompt_ids = runtime.encode(prompt) or [runtime.eot_id]
        ids, margins = greedy_ids(runtime, prompt_ids, n)
    finally:
        runtime.close()
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "expected_ids": ids,
        "min_logit_margin": round(min(margins), 6),
        "compare": "exact ids (greedy, onnxruntime CPU, threads 1)",
    }


def check_probe(bundle: Bundle | str | Path) -> dict[str, Any]:
    """Run the recorded probe (or, without one, one forward step) on this machine; ok + details."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    probe = bundle.manifest["llm"].get("health_probe")
    runtime = LlmRuntime(bundle, threads=1)
    try:
        if not probe:
            logits = runtime.forward([runtime.eot_id])[-1]
            finite = bool(np.isfinite(logits).all())
            return {
                "ok": finite and logits.size == int(runtime.config["vocab_size"]),
                "check": "forward step",
                "note": "the bundle records no health probe (folded before probes); ran one "
                "decoder step with its table row instead",
                "logits": int(logits.size),
                "finite": finite,
                **({} if finite else {"error": "decoder step gave non-finite logits"}),
            }
        got, margins = greedy_ids(runtime, probe["prompt_ids"], len(probe["expected_ids"]))
        tokenizer_ids = runtime.encode(probe["prompt"]) or [runtime.eot_id]
    finally:
        runtime.close()
    want = [int(i) for i in probe["expected_ids"]]
    tokenizer_ok = tokenizer_ids == probe["prompt_ids"]
    out: dict[str, Any] = {
        "ok": got == want and tokenizer_ok,
        "check": "probe",
        "prompt_tokens": len(probe["prompt_ids"]),
        "expected_ids": want,
        "got_ids": got,
        "tokenizer_ok": tokenizer_ok,
    }
    if got != want:
        k = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        out["error"] = (
            f"greedy probe differs from the ids recorded at fold time from token {k} on "
            f"(got {got[k]}, expected {want[k]}; top-2 logit margin here {margins[k]:.2g})"
        )
    elif not tokenizer_ok:
        out["error"] = "the tokenizer encodes the probe prompt differently from the recorded ids"
    return out
