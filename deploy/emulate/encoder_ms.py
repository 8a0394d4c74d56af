"""Encoder ms per frame here and on an (emulated) device, side by side: the emulation slowdown.

    python deploy/emulate/encoder_ms.py --bundle models/zoo/cartpole-ppo \\
        --device pi-4b-emu --ssh-config /tmp/emu/ssh_config

times each backend on this machine, then pipes this same file over ssh to the
device's runtime python (the release `current` there), which times the same bundle
on the same seeded frames, and prints both and the ratio. Only edge code and numpy
are imported, so it runs in a device runtime. On the arm64 emulator the device
figure is qemu-user's, an emulation cost: never read it as a Raspberry Pi's speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def time_encoder(bundle_dir: str, backend: str, frames: int) -> dict:
    """Median ms per single-frame encode after a warm-up (shaders compiled, buffers sized)."""
    import numpy as np

    from edge.encoder import make_encoder
    from splitedge.bundle import load_bundle

    bundle = load_bundle(Path(bundle_dir))
    shape = bundle.manifest["policy"]["observation"]["shape"]
    batch = np.random.default_rng(0).integers(0, 256, size=(8, *shape), dtype=np.uint8)
    encoder, why = make_encoder(bundle, backend)
    for i in range(3):
        encoder.encode(batch[i : i + 1])
    ms = []
    for i in range(frames):
        t0 = time.perf_counter()
        encoder.encode(batch[i % 8 : i % 8 + 1])
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"backend": backend, "ms": statistics.median(ms), "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="models/zoo/cartpole-ppo", help="bundle here")
    p.add_argument("--backends", default="ort,es2")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--device", default="", help="ssh host whose current release is timed too")
    p.add_argument("--ssh-config", default="")
    p.add_argument("--device-root", default="/opt/splitedge")
    p.add_argument("--json", action="store_true", help="one JSON line per backend (device side)")
    a = p.parse_args(argv)
    here = [time_encoder(a.bundle, b, a.frames) for b in a.backends.split(",")]
    if a.json:
        print("\n".join(json.dumps(r) for r in here))
        return 0
    there: dict[str, dict] = {}
    if a.device:
        python = f"{a.device_root}/current/runtime/venv/bin/python"
        remote = [python, "-", "--json", "--bundle", f"{a.device_root}/current/bundle"]
        remote += ["--backends", a.backends, "--frames", str(a.frames)]
        ssh = ["ssh", *(["-F", a.ssh_config] if a.ssh_config else []), a.device, "--", *remote]
        r = subprocess.run(ssh, stdin=open(__file__), capture_output=True, text=True)
        if r.returncode != 0:
            print(f"the device run failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
            return 1
        there = {d["backend"]: d for d in map(json.loads, r.stdout.splitlines()) if d}
    for h in here:
        d = there.get(h["backend"])
        line = f"{h['backend']:4}  {h['machine']} {h['ms']:8.2f} ms"
        if d:
            line += f"   {d['machine']} {d['ms']:8.2f} ms   x{d['ms'] / h['ms']:.1f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
