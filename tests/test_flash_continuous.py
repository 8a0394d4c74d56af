"""A continuous-action bundle (models/zoo/pendulum-sac) through the real flash path: the
health gate's round trip returns a torque in range and the device service runs its task."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT
from tests.test_flash_e2e import _cli, _current, _flash_args, needs_ssh

# slow end to end (`make test-slow`): flashes an emulated device (sshd, rsync, venv)
pytestmark = [needs_ssh, pytest.mark.slow, pytest.mark.timeout(300)]
PENDULUM = ROOT / "models" / "zoo" / "pendulum-sac"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from deploy.emulate.device import EmulatedDevice
    from deploy.server_process import ServerProcess

    tmp = tmp_path_factory.mktemp("flash-pendulum")
    server = ServerProcess(PENDULUM, extra_args=["--host", "0.0.0.0", "--grace-s", "0.5"])
    with pytest.MonkeyPatch.context() as mp, server, EmulatedDevice("pi-zero-2w") as dev:
        mp.setenv("SPLITEDGE_CACHE", str(tmp / "cache"))
        yield {"dev": dev, "server": f"{dev.host_address}:{server.port}", "tmp": tmp}


def test_pendulum_bundle_flashes_and_runs_on_the_device(env: dict) -> None:
    rc, r = _cli(env, *_flash_args(env, PENDULUM))
    assert rc == 0 and r["ok"], r
    assert _current(env["dev"].root) == "pendulum-sac-1.0.0"
    deadline = time.monotonic() + 120  # ~5 s on a quiet machine; a loaded one starts it later
    while time.monotonic() < deadline:
        rc, s = _cli(env, "status", "--host", env["dev"].host)
        if s.get("service", {}).get("steps", 0) >= 5:
            break
        time.sleep(0.5)
    health = s["last_health"]
    assert health["ok"] and health["encoder"]["max_diff_lsb"] <= 2
    (torque,) = health["round_trip"]["action"]
    assert -2.0 <= torque <= 2.0  # Pendulum's action space
    service = s["service"]
    assert service["source"] == "env:pendulum-pixels" and service["steps"] >= 5
    assert service["fallbacks"] == 0
