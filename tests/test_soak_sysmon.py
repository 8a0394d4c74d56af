"""edge.sysmon: thermal zones, Pi throttling bits, tegrastats lines, and the sampler."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from edge.sysmon import Sampler, parse_tegrastats, parse_throttled, thermal_zones


def test_thermal_zones_read_millidegrees(tmp_path: Path) -> None:
    for i, (kind, milli) in enumerate([("cpu-thermal", "45500"), ("gpu-thermal", "-1250")]):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    broken = tmp_path / "thermal_zone2"
    broken.mkdir()
    (broken / "temp").write_text("not a number")
    assert thermal_zones(tmp_path) == {"cpu-thermal": 45.5, "gpu-thermal": -1.25}


def test_vcgencmd_and_tegrastats_parsing() -> None:
    # 0x50005: under-voltage now (bit 0) and throttled now (bit 2), both seen since boot
    bits = parse_throttled("throttled=0x50005\n")
    assert bits == 0x50005 and bits & 1 and bits & 4 and bits & (1 << 16)
    assert parse_throttled("error") is None
    line = (
        "RAM 1500/3964MB (lfb 1x4MB) CPU [12%@1479,5%@1479,off,off] EMC_FREQ 0% "
        "GR3D_FREQ 0% PLL@36C CPU@38.5C PMIC@100C GPU@36.5C AO@45C thermal@37.25C POM_5V_IN 2"
    )
    temps = parse_tegrastats(line)
    assert temps["CPU"] == 38.5 and temps["GPU"] == 36.5 and temps["thermal"] == 37.25
    assert len(temps) == 6


def _wait(condition: Callable[[], bool], limit_s: float = 60.0) -> bool:
    """Poll condition until it holds or limit_s passes (a loaded machine starts Python slowly)."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_sampler_sees_a_busy_process_and_its_memory() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "b = bytearray(64 << 20)\nwhile True: b[0] = 1"])
    try:
        assert _wait(lambda: psutil.Process(spin.pid).memory_info().rss > 64 * 2**20)  # allocated
        sampler = Sampler(interval_s=0.2, pid=spin.pid).start()
        t0 = time.perf_counter()
        assert _wait(lambda: len(sampler.samples) >= 5)  # counted, not a fixed 1.3 s
        samples = sampler.stop()
        took_s = time.perf_counter() - t0
        rss_now = psutil.Process(spin.pid).memory_info().rss / 2**20
    finally:
        spin.kill()
        spin.wait()
    gaps = [b.t_s - a.t_s for a, b in zip(samples, samples[1:], strict=False)]
    # A sample per interval: never more often (a floor load cannot break); a loaded machine may
    # only stretch the gaps. Bug caught: an interval taken in the wrong unit, or no wait at all.
    assert len(samples) <= took_s / 0.2 + 1
    assert min(gaps) >= 0.2 * 0.95, gaps
    assert samples[-1].rss_mb == pytest.approx(rss_now, rel=0.1)
    assert samples[-1].rss_mb > 64  # the bytearray is resident
    assert max(s.cpu_pct for s in samples) > 10  # a spinning process shows up as busy


def test_sampler_of_this_process_and_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        Sampler(interval_s=0)
    s = Sampler(interval_s=1.0).sample()
    assert s.rss_mb == pytest.approx(psutil.Process(os.getpid()).memory_info().rss / 2**20, rel=0.2)
