"""Shared fixtures: a tiny trained policy bundle built once per test session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

# Small convs on a shared 2-core box: extra torch/OpenMP threads only contend (a single-frame
# SB3 predict took 81 ms with 2 threads vs 2.7 ms with 1 while both cores were busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# test_flash_commit forks the device's commit watchdog inside a pytest worker that may already
# have run gRPC tests; gRPC's fork handlers then broke the child (it died at once, or never
# started: 1 begin in ~30 with gRPC threads busy, 0 in 30 with this). On a device the fork
# happens in the stdlib-only device script, where there is no gRPC to disturb it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

ROOT = Path(__file__).resolve().parents[1]
ZOO_BUNDLE = ROOT / "models" / "zoo" / "cartpole-ppo"
# A links file with one short link for delay-aware training tests, and its delay in ticks
D_TEST_LINKS = """
[d-test]
up_kbit = 2000
down_kbit = 2000
delay_ms = 55
jitter_ms = 0
queue_bytes = 65536
"""
D_TEST_DEPTH = 3  # 110 + 10 ms at 20 Hz: 2.4 ticks -> 3, by hand


def _built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]
) -> Path:
    """build(out) once per test run, shared by every pytest-xdist worker (each is a process)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    from filelock import FileLock  # torch's dependency, so always there with the train extra

    shared = tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's own
    out, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PPO split policy trained for a few hundred steps: model.zip + result.json."""
    from models.train import TrainConfig, train

    def build(out: Path) -> None:
        cfg = TrainConfig(timesteps=512, n_envs=2, hyper={"n_steps": 128, "batch_size": 64})
        train(cfg, out, progress=False)

    return _built_once(tmp_path_factory, "run", build)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy bundle exported from tiny_run."""
    from models.export import export_policy

    def build(out: Path) -> None:
        export_policy(tiny_run / "model.zip", out / "tiny-cartpole", "tiny-cartpole", "0.0.1")

    return _built_once(tmp_path_factory, "bundle", build) / "tiny-cartpole"


SLOW_LINK = """
[slow]
up_kbit = 500
down_kbit = 1000
delay_ms = 15
jitter_ms = 0
queue_bytes = 65536
source = "test profile"
"""


@pytest.fixture()
def links_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A links TOML with one 'slow' profile (30 ms round trip), made the default for get_profile."""
    import deploy.link.profiles as profiles

    path = tmp_path / "links.toml"
    path.write_text(SLOW_LINK)
    monkeypatch.setattr(profiles, "DEFAULT_PROFILES", path)
    return path
