"""README's "Your own model" runs as written: the three files it shows are the example's
files, and the walkthrough trains, exports, verifies, serves and acts on a user env, then
flashes it to an emulated Pi Zero 2 W whose service runs the user's env."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import ROOT
from tests.test_flash_e2e import needs_ssh

EXAMPLE = ROOT / "examples" / "byom"
FILES = ("walkthrough.sh", "train.py", "act.py")


def test_readme_shows_the_example_files_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- byom:begin -->")[1].split("<!-- byom:end -->")[0]
    shown = dict(re.findall(r"`examples/byom/([\w.]+)`:\n\n```\w+\n(.*?)```", section, re.S))
    assert set(shown) == set(FILES)
    for name in FILES:
        assert shown[name] == (EXAMPLE / name).read_text(), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_ssh
def test_walkthrough_runs_as_written() -> None:
    # the user's own folder, outside splitedge; short, since the emulated device's service
    # socket lives under it and AF_UNIX paths stop at 107 bytes
    tmp = Path(tempfile.mkdtemp(prefix="byom-", dir="/tmp"))
    try:
        _walkthrough(tmp / "p")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _walkthrough(work: Path) -> None:
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("runs", "bundles", "__pycache__"))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",  # small convs: more threads only contend on a shared CI box
    }
    env.pop("PYTHONPATH", None)  # the env module is found from the user's folder alone
    proc = subprocess.run(
        ["bash", "walkthrough.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    assert "ort 100.0% of 200" in out and "fits pi-zero-2w" in out
    assert "bundles/dot: OK" in out
    mean = re.search(r"100 decisions, mean reward (-?[\d.]+), fallbacks (\d+)", out)
    assert mean is not None, out[-2000:]
    assert int(mean.group(2)) == 0
    # flashed: the device committed the release after its health gate and runs the user's env
    assert "release state  committed: dot-1.0.0" in out, out[-3000:]
    assert re.search(r"service +\S+: active, running, \d+ steps", out), out[-3000:]
