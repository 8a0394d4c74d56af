"""Device telemetry under sustained load: CPU %, RSS, temperatures and throttling, sampled.

Sources, each used only when present:
- this process's CPU % and RSS (psutil), and the whole machine's CPU %;
- Linux thermal zones (/sys/class/thermal/thermal_zone*/temp, millidegrees C);
- `vcgencmd get_throttled` on a Raspberry Pi (bit 0 under-voltage, 1 frequency capped,
  2 throttled, 3 soft temperature limit; bits 16-19 "has happened since boot");
- `tegrastats` on a Jetson (its temperature fields, e.g. `CPU@45.5C`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

THERMAL_ROOT = Path("/sys/class/thermal")
_TEGRA_TEMP = re.compile(r"(\w+)@(-?\d+(?:\.\d+)?)C")


@dataclass
class Sample:
    """One telemetry sample; t_s is seconds since the sampler started."""

    t_s: float
    cpu_pct: float  # this process, % of one core
    system_cpu_pct: float  # whole machine, % of all cores
    rss_mb: float
    temps_c: dict[str, float] = field(default_factory=dict)
    throttled: int | None = None  # vcgencmd get_throttled bits, when on a Pi

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def thermal_zones(root: Path = THERMAL_ROOT) -> dict[str, float]:
    """Every readable thermal zone as {type or zone name: degrees C}."""
    temps: dict[str, float] = {}
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue  # some zones refuse reads while their sensor sleeps
        try:
            name = (zone / "type").read_text().strip() or zone.name
        except OSError:
            name = zone.name
        temps[name if name not in temps else zone.name] = milli / 1000.0
    return temps


def parse_throttled(text: str) -> int | None:
    """The bit field of `vcgencmd get_throttled` output such as 'throttled=0x50005'."""
    m = re.search(r"throttled=(0x[0-9a-fA-F]+)", text)
    return int(m.group(1), 16) if m else None


def read_throttled() -> int | None:
    """Pi throttling bits now, or None where vcgencmd is absent or fails."""
    if shutil.which("vcgencmd") is None:
        return None
    try:
        r = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_throttled(r.stdout)


def parse_tegrastats(line: str) -> dict[str, float]:
    """Temperatures from one tegrastats line: {'CPU': 45.5, 'GPU': 43.0, ...}."""
    return {name: float(v) for name, v in _TEGRA_TEMP.findall(line)}


class Sampler:
    """Samples telemetry every interval_s in a background thread; stop() returns the samples."""

    def __init__(self, interval_s: float = 0.5, pid: int | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._proc = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tegra: subprocess.Popen[str] | None = None
        self._tegra_last: dict[str, float] = {}
        self.sources = ["psutil"]
        if thermal_zones():
            self.sources.append("thermal_zones")
        if shutil.which("vcgencmd"):
            self.sources.append("vcgencmd")
        if shutil.which("tegrastats"):
            self.sources.append("tegrastats")

    def start(self) -> Sampler:
        """Begin sampling (the first CPU % reading covers the first interval)."""
        self._proc.cpu_percent(None)
        psutil.cpu_percent(None)
        if "tegrastats" in self.sources:
            self._start_tegrastats()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="sysmon", daemon=True)
        self._thread.start()
        return self

    def _start_tegrastats(self) -> None:
        ms = str(max(100, int(self.interval_s * 1000)))
        try:
            self._tegra = subprocess.Popen(
                ["tegrastats", "--interval", ms], stdout=subprocess.PIPE, text=True
            )
        except OSError:
            return
        threading.Thread(target=self._read_tegrastats, daemon=True).start()

    def _read_tegrastats(self) -> None:
        assert self._tegra is not None and self._tegra.stdout is not None
        for line in self._tegra.stdout:
            self._tegra_last = parse_tegrastats(line)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())

    def sample(self) -> Sample:
        """One sample now."""
        temps = thermal_zones()
        temps.update({f"tegra:{k}": v for k, v in self._tegra_last.items()})
        return Sample(
            t_s=time.perf_counter() - getattr(self, "_t0", time.perf_counter()),
            cpu_pct=self._proc.cpu_percent(None),
            system_cpu_pct=psutil.cpu_percent(None),
            rss_mb=self._proc.memory_info().rss / 2**20,
            temps_c=temps,
            throttled=read_throttled() if "vcgencmd" in self.sources else None,
        )

    def stop(self) -> list[Sample]:
        """Stop sampling; returns every sample taken."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 2)
        if self._tegra is not None:
            self._tegra.terminate()
            self._tegra.wait()
        return self.samples
