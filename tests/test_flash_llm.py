"""Flashing an llm bundle: the probe recorded at fold time, then the emulated device end to end.

The device tests run in order against one emulated device (real sshd, rsync, venv): a tiny
folded MeKi bundle is flashed offline and its greedy probe must pass on the device; a
corrupted table is refused by the device's hash check; a bundle whose recorded probe is
wrong (manifest hashes rewritten, so only the probe can catch it) is rolled back.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.meki.fold import fold_run
from models.meki.model import MeKiConfig
from splitedge.bundle import write_manifest
from splitedge.cli import main
from splitedge.errors import SplitedgeError
from tests.test_flash_e2e import _cli, _current, _previous, needs_ssh
from tests.test_llm_runtime import SMALL
from tests.test_meki_fold import build_run

NAME = "tiny-meki"
V1, BAD = f"{NAME}-1.0.0", f"{NAME}-1.0.1"


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random-init MeKi run folded into an fp32 llm bundle, and its torch model."""
    root = tmp_path_factory.mktemp("llm-flash")
    val = np.random.default_rng(0).integers(1, 300, size=400)
    model = build_run(root / "run", MeKiConfig(meki="both", **SMALL), val)
    fold_run(root / "run", root / NAME, dtype="fp32", name=NAME, val_tokens=300)
    return {"root": root, "bundle": root / NAME, "model": model}


def _rewritten(src: Path, out: Path, edit: dict) -> Path:
    """A copy of src with manifest["llm"] keys replaced and the manifest hashes rewritten."""
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("format")
    manifest.pop("files")
    for key, value in edit.items():
        if value is None:
            manifest["llm"].pop(key, None)
        elif key == "version":
            manifest["version"] = value
        else:
            manifest["llm"][key] = value
    write_manifest(out, manifest)
    return out


def test_fold_records_the_greedy_ids_the_torch_model_gives(folded: dict) -> None:
    probe = json.loads((folded["bundle"] / "manifest.json").read_text())["llm"]["health_probe"]
    ids = list(probe["prompt_ids"])
    assert len(ids) + len(probe["expected_ids"]) <= SMALL["block_size"], "no sliding in the ref"
    want, margins = [], []
    with torch.no_grad():  # reference: the training-form model, whole sequence each step
        for _ in probe["expected_ids"]:
            logits = folded["model"](torch.tensor([ids + want]))[0][0, -1].double()
            top2 = torch.topk(logits, 2).values
            want.append(int(logits.argmax()))
            margins.append(float(top2[0] - top2[1]))
    assert min(margins) > 1e-4, "no near tie: float rounding cannot flip the reference"
    assert probe["expected_ids"] == want


def test_bundle_without_a_probe_gets_a_forward_step(folded: dict) -> None:
    from edge.llm.probe import check_probe

    old = _rewritten(folded["bundle"], folded["root"] / "no-probe", {"health_probe": None})
    r = check_probe(old)
    assert r["ok"] and r["check"] == "forward step" and r["finite"]
    assert "no health probe" in r["note"]
    r = check_probe(folded["bundle"])
    assert r["ok"] and r["check"] == "probe" and r["got_ids"] == r["expected_ids"]


@pytest.fixture(scope="module")
def env(folded: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from deploy.emulate.device import EmulatedDevice

    tmp = tmp_path_factory.mktemp("flash-llm")
    with pytest.MonkeyPatch.context() as mp, EmulatedDevice("pi-zero-2w") as dev:
        mp.setenv("SPLITEDGE_CACHE", str(tmp / "cache"))
        yield {"dev": dev, "tmp": tmp, **folded}


def _flash(env: dict, bundle: Path) -> list[str]:
    return ["flash", "--host", env["dev"].host, "--bundle", str(bundle)]


@needs_ssh
@pytest.mark.slow  # flashes an emulated device (sshd, rsync, venv): `make test-slow`
@pytest.mark.timeout(300)
def test_llm_flash_passes_its_probe_on_the_device(env: dict) -> None:
    root: Path = env["dev"].root
    t0 = time.monotonic()
    rc, r = _cli(env, *_flash(env, env["bundle"]), "--profile", "pi-zero-2w", "--offline")
    print(f"\nllm flash to the emulated device: {time.monotonic() - t0:.1f} s; {r['steps']}")
    assert rc == 0 and r["release"] == V1 and _current(root) == V1
    release = root / "releases" / V1
    assert not (release / "service.json").exists() and not (release / "probe.npz").exists()
    site = next((release / "runtime").resolve().glob("venv/lib/python3*/site-packages"))
    assert (site / "onnxruntime").is_dir() and (site / "tokenizers").is_dir()
    assert not (site / "torch").exists() and not (site / "models").exists()
    health = json.loads((root / "state" / "health.json").read_text())
    recorded = json.loads((env["bundle"] / "manifest.json").read_text())["llm"]["health_probe"]
    assert health["ok"] and health["kind"] == "llm" and health["release"] == V1
    assert health["probe"]["check"] == "probe" and health["probe"]["tokenizer_ok"]
    assert health["probe"]["got_ids"] == recorded["expected_ids"]
    assert not (root / "run" / "supervisor.pid").exists(), "an llm bundle starts no service"

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the human table, as a user sees it
        assert (
            main(["status", "--host", env["dev"].host, "--ssh-config", str(env["dev"].ssh_config)])
            == 0
        )
    text = buf.getvalue()
    assert f"{V1} (llm bundle)" in text and "no control loop" in text and "llm greedy probe" in text
    rc, s = _cli(env, "status", "--host", env["dev"].host)
    assert rc == 0 and s["current"] == V1 and s["kind"] == "llm" and s["last_health"]["ok"]


@needs_ssh
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_corrupted_table_is_refused_and_a_wrong_probe_rolls_back(env: dict) -> None:
    from deploy.flash.package import stage_release
    from deploy.flash.transport import DeviceRefused, Target, Transport
    from splitedge.bundle import load_bundle

    dev, root, tmp = env["dev"], env["dev"].root, env["tmp"]
    assert _current(root) == V1
    # a table corrupted after the copy is caught by the device's hash check, before any switch
    t = Transport(Target.parse(dev.host), ssh_config=dev.ssh_config)
    rel = f"{NAME}-9.9.9"
    stage_release(load_bundle(env["bundle"]), tmp / rel, str(root), None, {}, {})
    t.op("prepare", str(root), release=rel)
    t.copy(tmp / rel, f"{root}/incoming/{rel}")
    with open(root / "incoming" / rel / "bundle" / "table.bin", "r+b") as f:
        f.seek(64)
        f.write(b"\x13\x37\x13\x37")
    with pytest.raises(DeviceRefused, match="table.bin: sha256 does not match"):
        t.op("stage", str(root), release=rel)
    assert _current(root) == V1 and not (root / "releases" / rel).exists()

    # a wrong recorded probe with consistent hashes: the switch happens, the gate rolls it back
    probe = json.loads((env["bundle"] / "manifest.json").read_text())["llm"]["health_probe"]
    wrong = [(i + 1) % SMALL["vocab_size"] for i in probe["expected_ids"]]
    bad = _rewritten(
        env["bundle"],
        tmp / "bad",
        {"version": "1.0.1", "health_probe": {**probe, "expected_ids": wrong}},
    )
    from deploy.flash.flasher import FlashOptions, flash

    with pytest.raises(
        SplitedgeError,
        match=f"health gate failed.*greedy probe differs.*Rolled back automatically: current is {V1}",
    ):
        flash(
            FlashOptions(
                host=dev.host,
                bundle=bad,
                profile="pi-zero-2w",
                offline=True,
                ssh_config=dev.ssh_config,
            )
        )
    assert _current(root) == V1 and _previous(root) is None
    events = [json.loads(x) for x in (root / "state" / "history.jsonl").read_text().splitlines()]
    assert [(e["event"], e["to"]) for e in events] == [
        ("flash", V1),
        ("commit", V1),
        ("flash", BAD),
        ("revert", V1),
    ]
    health = json.loads((root / "state" / "health.json").read_text())
    assert health["ok"] and health["release"] == V1, "the restored release was checked"
