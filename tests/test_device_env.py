"""The device side takes the user's env, and device limits are checked wherever a profile is named.

One bundle for the module: an SB3 PPO CnnPolicy (NatureCNN) on the user's DotTrack env
(examples/byom, importable only from its folder, as a user's project), exported with
`--env dot_env:DotTrack`, plus a copy that records no env (as a bundle exported from a
frames file). NatureCNN's second conv (4x4 over 32 channels) needs 128 texture samples in
one pass: more than a Pi Zero 2 W allows, so the same bundle is the one the limits refuse.
`edge run`, `measure`, `bench encoder` and `soak` run it, and a wrong env is one line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from splitedge.bundle import load_bundle, write_manifest
from splitedge.cli import main
from tests.conftest import ROOT, ZOO_BUNDLE

USER_DIR = ROOT / "examples" / "byom"
ENV = "dot_env:DotTrack"
STEPS = 100  # DotTrack truncates an episode after 100 steps


@pytest.fixture(scope="module")
def user_env() -> Iterator[Any]:
    """dot_env importable here and in every process we start, as from the user's folder."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(USER_DIR), saved) if p)
    sys.path.insert(0, str(USER_DIR))
    import dot_env

    yield dot_env
    sys.path.remove(str(USER_DIR))
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def bundles(user_env: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{"model", "recorded": bundle with its env, "unrecorded": the same without one}."""
    import torch
    from stable_baselines3 import PPO

    model = PPO("CnnPolicy", user_env.DotTrack(), n_steps=64, seed=0)
    with torch.no_grad():  # untrained logits are near-ties; scaled, actions are decisive
        model.policy.action_net.weight.mul_(100.0)
    tmp = tmp_path_factory.mktemp("device-env")
    model.save(tmp / "model.zip")
    recorded = tmp / "dot-nature"
    argv = ["export", "--model", str(tmp / "model.zip"), "--out", str(recorded), "--env", ENV]
    assert main(argv) == 0
    unrecorded = tmp / "dot-nature-no-env"
    shutil.copytree(recorded, unrecorded)
    manifest = json.loads((unrecorded / "manifest.json").read_text())
    for key in ("format", "files"):
        manifest.pop(key)
    manifest["policy"]["env"] = None
    write_manifest(unrecorded, manifest)
    return {"model": model, "recorded": recorded, "unrecorded": unrecorded}


@pytest.fixture(scope="module")
def server(bundles: dict[str, Any]) -> Iterator[str]:
    from tests.test_server import start, stop

    served = start(bundles["recorded"])  # the copy has the same encoder: the server takes both
    yield f"127.0.0.1:{served.port}"
    stop(served)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """The CLI's exit status, its JSON output (if any) and its stderr."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    doc = json.loads(out) if rc == 0 and out.strip().startswith("{") else None
    return rc, doc, err


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("splitedge: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _predict_return(model: Any, dot_env: Any, seed: int = 0) -> float:
    """The reference: SB3's own predict acting in the user's env for one episode."""
    env = dot_env.DotTrack()
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        action = int(np.asarray(model.predict(obs, deterministic=True)[0]).reshape(-1)[0])
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        done = terminated or truncated
    return total


def test_edge_run_acts_in_the_users_env_recorded_or_named(
    bundles: dict[str, Any], server: str, user_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    want = _predict_return(bundles["model"], user_env)
    for bundle, extra in ((bundles["recorded"], []), (bundles["unrecorded"], ["--env", ENV])):
        rc, doc, err = _run(capsys, "edge", "run", "--bundle", str(bundle), "--server", server,
                            "--steps", str(STEPS), "--backend", "ort", "--json", *extra)  # fmt: skip
        assert rc == 0, err
        assert doc["env"] == ENV and doc["fallbacks"] == 0 and doc["episodes"] == 1
        assert doc["mean_return"] == pytest.approx(want, rel=1e-9), bundle.name


def test_a_wrong_env_is_one_line_before_anything_runs(
    bundles: dict[str, Any], user_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = "127.0.0.1:1"  # refused before any connection is tried
    base = ["edge", "run", "--bundle", str(bundles["recorded"]), "--server", dead, "--steps", "1"]
    rc, _, err = _run(capsys, *base, "--env", "cartpole-pixels")
    _one_line_error(rc, err, "(3, 48, 48)", "(2, 40, 56)")
    rc, _, err = _run(capsys, *base, "--env", "no_such_user_module:Env")
    _one_line_error(rc, err, "cannot import 'no_such_user_module'", "PYTHONPATH")
    rc, _, err = _run(capsys, *base, "--env-kwargs", '{"speed": 3}')
    _one_line_error(rc, err, "speed")
    rc, _, err = _run(capsys, *base, "--env-kwargs", "[1]")
    _one_line_error(rc, err, "JSON object")
    unrecorded = ["edge", "run", "--bundle", str(bundles["unrecorded"]), "--server", dead]
    rc, _, err = _run(capsys, *unrecorded)
    _one_line_error(rc, err, "names no env", "--env")
    out = Path(str(bundles["recorded"]) + "-measure")
    rc, _, err = _run(capsys, "measure", "--bundle", str(bundles["recorded"]), "--links", "wifi",
                      "--link-backend", "proxy", "--out", str(out), "--env", "CartPole-v1")  # fmt: skip
    _one_line_error(rc, err, "Box", "uint8")  # CartPole's state vector is no image
    rc, _, err = _run(capsys, "soak", "--minutes", "1", "--bundle", str(bundles["unrecorded"]),
                      "--link-backend", "proxy", "--out", str(out), "--no-progress")  # fmt: skip
    _one_line_error(rc, err, "names no env")


def test_measure_and_soak_run_the_users_env_in_their_edge_processes(
    bundles: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, doc, err = _run(capsys, "measure", "--bundle", str(bundles["recorded"]), "--links", "wifi",
                        "--modes", "split", "--steps", "5", "--warmup", "1",
                        "--link-backend", "proxy", "--out", str(tmp_path / "m"),
                        "--no-progress", "--json")  # fmt: skip
    assert rc == 0, err
    (row,) = doc["rows"]
    assert doc["env"] == ENV and row["steps"] == 5 and row["fallbacks"] == 0
    # the features of the user's model crossed the link, not its 2x40x56 frames
    features = math.prod(load_bundle(bundles["recorded"]).policy["encoder"]["output"]["shape"])
    assert features * 4 <= row["msg_up_B"] < 2 * 40 * 56
    rc, doc, err = _run(capsys, "soak", "--minutes", "0.02", "--bundle", str(bundles["unrecorded"]),
                        "--env", ENV, "--link-backend", "proxy", "--windows", "2",
                        "--backend", "ort", "--out", str(tmp_path / "s"), "--no-progress",
                        "--json")  # fmt: skip
    assert rc == 0, err
    assert doc["env"] == ENV and doc["decisions"] > 0
    assert sum(w["fallbacks"] for w in doc["windows"]) == 0


def test_bench_encoder_takes_observations_and_episodes_from_the_users_env(
    bundles: dict[str, Any], user_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_shader_gl import need_gl

    want = _predict_return(bundles["model"], user_env)
    common = ["--batch", "1", "--seconds", "0.05", "--agreement", "16", "--json"]
    rc, doc, err = _run(capsys, "bench", "encoder", "--bundle", str(bundles["unrecorded"]),
                        "--backends", "ort", "--env", ENV, "--episodes", "1", *common)  # fmt: skip
    assert rc == 0, err
    (row,) = doc["fidelity"]
    assert doc["env"] == ENV and row["mean_return"] == pytest.approx(want, rel=1e-9)
    need_gl("gl33")
    rc, doc, err = _run(capsys, "bench", "encoder", "--bundle", str(bundles["recorded"]),
                        "--backends", "ort,gl33", *common)  # fmt: skip
    assert rc == 0, err
    rows = {r["backend"]: r for r in doc["fidelity"]}
    assert doc["env"] == ENV and rows["gl33"]["actions_identical_%"] == 100.0


def test_env_frames_step_a_continuous_action_space(bundles: dict[str, Any], user_env: Any) -> None:
    from edge.encoder.calibrate import policy_frames

    policy = load_bundle(bundles["recorded"]).policy
    frames = policy_frames(policy, 12, seed=3, env_kwargs={"continuous": True})
    first, _ = user_env.DotTrack(continuous=True).reset(seed=3)
    assert frames.shape == (12, 2, 40, 56) and np.array_equal(frames[0], first)
    # every frame is a picture of DotTrack: a 3x3 dot and a 3x3 cursor, one per channel
    assert (frames == 255).sum(axis=(2, 3)).tolist() == [[9, 9]] * 12
    assert len({f.tobytes() for f in frames}) > 6, "the cursor moved: Box actions were stepped"


def test_the_device_service_opens_the_users_env_or_says_why(
    bundles: dict[str, Any], user_env: Any
) -> None:
    from deploy.flash.package import parse_source
    from edge.sources import ConfigError, open_source

    recorded = load_bundle(bundles["recorded"]).policy
    unrecorded = load_bundle(bundles["unrecorded"]).policy
    for policy, cfg in ((recorded, parse_source("env")), (unrecorded, parse_source(f"env:{ENV}"))):
        src = open_source(cfg, policy)
        first, _ = user_env.DotTrack().reset(seed=0)
        assert src.name == f"env:{ENV}" and np.array_equal(src.read(), first)
        src.close()
    with pytest.raises(ConfigError, match="needs an env .* --source env:"):
        open_source(parse_source("env"), unrecorded)
    with pytest.raises(ConfigError, match="cannot import 'gone_module'"):
        open_source(parse_source("env:gone_module:Env"), recorded)


def _conv_samples(bundle: Path, textures_per_group: int = 4) -> dict[str, int]:
    """Texture samples one output pass of each conv needs, from the IR: the reference number."""
    ir = json.loads((bundle / "encoder_ir.json").read_text())
    return {
        layer["name"]: math.ceil(layer["in_channels"] / textures_per_group) * layer["kernel"] ** 2
        for layer in ir["layers"]
        if layer["op"] == "conv"
    }


def test_profile_limits_refuse_the_bundle_at_flash_preflight_and_edge_run(
    bundles: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy.devices import load_profile
    from deploy.flash import flasher
    from deploy.flash.transport import Transport

    bundle = bundles["recorded"]
    limit = load_profile("pi-zero-2w").max_samples_per_pass
    over = {n: s for n, s in _conv_samples(bundle).items() if s > limit}
    assert over, "NatureCNN must need more samples per pass than a Pi Zero 2 W allows"
    name, samples = next(iter(over.items()))

    def nothing_runs(*a: object, **k: object) -> None:
        raise AssertionError("pre-flight must refuse before contacting or copying anything")

    monkeypatch.setattr(subprocess, "run", nothing_runs)
    monkeypatch.setattr(subprocess, "Popen", nothing_runs)
    flash = ["flash", "--host", "pi@cam.local", "--profile", "pi-zero-2w", "--server", "h:1"]
    rc, _, err = _run(capsys, *flash, "--bundle", str(bundle), "--json")
    _one_line_error(rc, err, "pre-flight failed", "nothing was changed", f"layer {name}",
                    str(samples), str(limit), "pi-zero-2w")  # fmt: skip
    rc, _, err = _run(capsys, "edge", "run", "--bundle", str(bundle), "--server", "127.0.0.1:1",
                      "--profile", "pi-zero-2w")  # fmt: skip
    _one_line_error(rc, err, f"layer {name}", str(samples), str(limit), "pi-zero-2w")
    monkeypatch.undo()

    # the shipped bundle fits: flash goes on to ask the device for its facts
    class Contacted(Exception):
        pass

    def facts(self: Any, op: str, *a: object, **k: object) -> None:
        raise Contacted(op)

    monkeypatch.setattr(Transport, "op", facts)
    opts = flasher.FlashOptions(host="pi@cam.local", bundle=ZOO_BUNDLE, profile="pi-zero-2w")
    with pytest.raises(Contacted, match="facts"):
        flasher.flash(opts)


def test_the_shipped_bundle_passes_edge_run_with_a_profile(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.test_server import start, stop

    served = start(ZOO_BUNDLE)
    try:
        rc, doc, err = _run(capsys, "edge", "run", "--bundle", str(ZOO_BUNDLE), "--server",
                            f"127.0.0.1:{served.port}", "--steps", "3", "--backend", "ort",
                            "--profile", "pi-zero-2w", "--json")  # fmt: skip
    finally:
        stop(served)
    assert rc == 0, err
    assert doc["profile"].startswith("fits pi-zero-2w") and doc["env"] == "cartpole-pixels"


def test_env_package_travels_with_the_release_and_the_service_imports_it(
    bundles: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zipfile

    from deploy.flash import remote
    from deploy.flash.env_package import env_wheels
    from deploy.flash.package import parse_sink, parse_source, stage_release
    from splitedge.errors import SplitedgeError

    monkeypatch.setenv("SPLITEDGE_CACHE", str(tmp_path / "cache"))
    (wheel,) = env_wheels([USER_DIR], ENV)
    assert env_wheels([USER_DIR], ENV) == [wheel], "built once per content"
    with zipfile.ZipFile(wheel) as z:
        modules = [n for n in z.namelist() if n.endswith(".py")]
        assert modules == ["dot_env.py"], "only the env's module, not the folder's other scripts"
        assert z.read("dot_env.py") == (USER_DIR / "dot_env.py").read_bytes()

    release = tmp_path / "releases" / "dot-1.0.0"
    bundle = load_bundle(bundles["unrecorded"])
    stage_release(bundle, release, str(tmp_path), "h:1", parse_source(f"env:{ENV}"),
                  parse_sink("log"), None, [wheel])  # fmt: skip
    assert remote.check_env_wheels(release) == []
    assert remote.install_env_packages(release, Path(sys.executable)) == [wheel.name]
    assert (release / "packages" / "dot_env.py").read_bytes() == (
        USER_DIR / "dot_env.py"
    ).read_bytes()
    # a process that cannot import dot_env by itself, as the device's service
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import sys; from edge.service import ServiceConfig; from edge.sources import open_source;"
        "from splitedge.bundle import load_bundle;"
        f"cfg = ServiceConfig.load({str(release / 'service.json')!r}); cfg.use_packages();"
        "src = open_source(cfg.source, load_bundle(cfg.bundle).policy);"
        "print(src.name, src.read().shape, sys.modules['dot_env'].__file__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.split() == [f"env:{ENV}", "(2,", "40,", "56)", str(release / "packages/dot_env.py")]

    (release / "wheels" / wheel.name).write_bytes(b"not the wheel")
    assert remote.check_env_wheels(release) == [
        f"wheels/{wheel.name}: sha256 does not match service.json"
    ]
    with pytest.raises(SplitedgeError, match="not found"):
        env_wheels([tmp_path / "nowhere"], ENV)
    with pytest.raises(SplitedgeError, match="must be an entry point"):
        env_wheels([USER_DIR], "CartPole-v1")
    with pytest.raises(SplitedgeError, match="no other_env.py or other_env/__init__.py"):
        env_wheels([USER_DIR], "other_env:Env")
