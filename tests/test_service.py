"""The on-device service: sources, sinks, sd_notify, the loop against a real server, clear config errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge.service import EX_CONFIG, ServiceConfig, run_service, sd_notify, supervise
from edge.sinks import EntrypointSink, SocketSink, open_sink
from edge.sources import ConfigError, FrameShaper, open_source
from tests.conftest import ROOT, ZOO_BUNDLE

cv2 = pytest.importorskip("cv2", reason="camera/video sources need opencv-python-headless")
OBS = {"shape": [3, 48, 48], "dtype": "uint8", "layout": "CHW"}


def _bgr(h: int = 96, w: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_gray_stack_matches_an_area_mean_of_the_luma_reference() -> None:
    shaper = FrameShaper((3, 48, 48), "gray-stack")
    frames = [_bgr(seed=i) for i in range(4)]
    outs = [shaper(f) for f in frames]

    def reference(bgr: np.ndarray) -> np.ndarray:  # ITU-R 601 luma of the 2x2 block means
        small = bgr.astype(np.float64).reshape(48, 2, 48, 2, 3).mean(axis=(1, 3))
        return small @ np.array([0.114, 0.587, 0.299])

    assert outs[0].shape == (3, 48, 48) and outs[0].dtype == np.uint8
    assert all(np.array_equal(outs[0][c], outs[0][0]) for c in range(3)), (
        "first frame repeated, like reset()"
    )
    for c, k in enumerate((1, 2, 3)):  # the last frame is the newest channel
        assert np.abs(outs[3][c].astype(float) - reference(frames[k])).max() <= 1.0
    rgb = FrameShaper((3, 48, 48), "rgb")(frames[0])
    ref_rgb = (
        frames[0]
        .astype(float)
        .reshape(48, 2, 48, 2, 3)
        .mean(axis=(1, 3))[:, :, ::-1]
        .transpose(2, 0, 1)
    )
    assert np.abs(rgb - ref_rgb).max() <= 1.0
    with pytest.raises(ConfigError, match="does not fit"):
        FrameShaper((3, 48, 48), "gray")


def test_video_source_reads_loops_and_a_missing_camera_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    levels = (40, 200, 120)
    for v in levels:
        writer.write(np.full((64, 64, 3), v, np.uint8))
    writer.release()
    src = open_source(
        {"kind": "video", "path": str(path), "channels": "gray"},
        {"observation": {**OBS, "shape": [1, 48, 48]}},
    )
    seen = [float(src.read().mean()) for _ in range(5)]  # type: ignore[union-attr]
    src.close()
    assert np.allclose(seen, [*levels, *levels[:2]], atol=3), (
        "uniform frames survive MJPG; the clip loops"
    )
    with pytest.raises(ConfigError, match="camera /dev/video77 not found"):
        open_source({"kind": "camera", "device": "/dev/video77"}, {"observation": OBS})
    with pytest.raises(ConfigError, match="video file .* not found"):
        open_source({"kind": "video", "path": str(tmp_path / "none.mp4")}, {"observation": OBS})
    with pytest.raises(ConfigError, match="source kind 'usb'"):
        open_source({"kind": "usb"}, {"observation": OBS})


def test_socket_sink_sends_json_lines_and_drops_gone_readers(tmp_path: Path) -> None:
    sink = open_sink({"kind": "socket"}, tmp_path)
    assert isinstance(sink, SocketSink)
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reader.connect(str(tmp_path / "actions.sock"))
    sink.send(0, 1, {"fallback": False})
    sink.send(1, np.array([0.5, -0.25], np.float32), {"fallback": True})
    reader.settimeout(5)
    data = b""
    while data.count(b"\n") < 2:
        data += reader.recv(4096)
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert [(x["step"], x["action"], x["fallback"]) for x in lines] == [
        (0, 1, False),
        (1, [0.5, -0.25], True),
    ]
    reader.close()
    for i in range(3):
        sink.send(2 + i, 0, {})
    assert sink.clients == [] and sink.dropped == 1
    sink.close()
    assert not (tmp_path / "actions.sock").exists()


def test_entrypoint_sink_calls_user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "robot_io.py").write_text(
        "got = []\ndef apply(action, info):\n    got.append((action, info['step']))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sink = EntrypointSink("robot_io:apply")
    sink.send(3, 1, {})
    import robot_io  # type: ignore[import-not-found]

    assert robot_io.got == [(1, 3)]
    with pytest.raises(ConfigError, match="cannot be loaded"):
        EntrypointSink("robot_io:nope")
    with pytest.raises(ConfigError, match="package.module:function"):
        EntrypointSink("robot_io")


def test_sd_notify_speaks_the_datagram_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    addr = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(addr))
    monkeypatch.setenv("NOTIFY_SOCKET", str(addr))
    assert sd_notify("READY=1")
    assert server.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False
    server.close()


def _config(tmp_path: Path, **over: object) -> Path:
    cfg = {
        "bundle": str(ZOO_BUNDLE),
        "server": "127.0.0.1:1",
        "source": {"kind": "env"},
        "sink": {"kind": "socket"},
        "state_dir": "state",
        "run_dir": "run",
        "rate_hz": 0,
        **over,
    }
    path = tmp_path / "service.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.timeout(120)  # a supervisor that restarted a config error would loop forever
def test_missing_camera_exits_78_once_with_one_line_and_no_restart(tmp_path: Path) -> None:
    cfg = _config(tmp_path, source={"kind": "camera", "device": "/dev/video77"})
    r = subprocess.run(
        [sys.executable, "-m", "edge.service", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == EX_CONFIG
    assert r.stderr.strip().splitlines() == [
        "splitedge service: camera /dev/video77 not found: is it connected and enabled? (`ls /dev/video*`; "
        "on a Pi with libcamera, use the V4L2 compatibility device)"
    ]
    state = json.loads((tmp_path / "state" / "service.json").read_text())
    assert state["state"] == "failed" and state["exit"] == EX_CONFIG
    # the fallback supervisor treats 78 as final: it returns instead of looping
    root = tmp_path / "root"
    release = root / "releases" / "r"
    (release / "runtime" / "venv" / "bin").mkdir(parents=True)
    python = release / "runtime" / "venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # a symlink would lose the venv
    python.chmod(0o755)
    (release / "service.json").write_text(cfg.read_text())
    (root / "state").mkdir()
    (root / "current").symlink_to("releases/r")
    env_pp = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT)
    try:
        assert supervise(root) == EX_CONFIG
    finally:
        os.environ.pop("PYTHONPATH") if env_pp is None else os.environ.__setitem__(
            "PYTHONPATH", env_pp
        )
    assert json.loads((root / "state" / "supervisor.json").read_text())["restarts"] == 0


def test_service_loop_against_a_real_server(tmp_path: Path) -> None:
    from deploy.server_process import ServerProcess

    with ServerProcess(ZOO_BUNDLE) as server:
        cfg = ServiceConfig.load(
            _config(
                tmp_path,
                server=server.address,
                max_steps=40,
                sink={"kind": "socket", "path": str(tmp_path / "a.sock")},
            )
        )
        lines: list[dict] = []
        done = threading.Event()

        def read() -> None:
            import time

            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            end = time.monotonic() + 60  # until the service opens its sink (later under load)
            while True:
                try:
                    s.connect(str(tmp_path / "a.sock"))
                    break
                except OSError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.002)
            buf = b""
            s.settimeout(30)
            while not done.is_set():
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            lines.extend(json.loads(x) for x in buf.decode().splitlines())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert run_service(cfg) == 0
        done.set()
        reader.join(timeout=30)
    state = json.loads((tmp_path / "state" / "service.json").read_text())
    assert state["state"] == "stopped" and state["steps"] == 40 and state["fallbacks"] == 0
    assert lines, "the reader got the actions"
    steps = [x["step"] for x in lines]
    assert steps == list(range(steps[0], 40)), "consecutive steps once connected"
    assert all(x["action"] in (0, 1) and x["fallback"] is False for x in lines)
