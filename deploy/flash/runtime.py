"""The edge runtime a device needs: the splitedge wheel (edge code only, no torch) and its wheels.

The project wheel is built from this checkout's `splitedge`, `edge` and `protos`
packages only: nothing from `models/` (torch) or `server/` reaches a device. With
--offline every dependency is downloaded here for the device's platform
(`pip download --platform ...` from what pre-flight reported) and carried in
the transfer; otherwise the device's pip fetches them from its package index.
Both are cached under ~/.cache/splitedge, keyed by content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError

REPO = Path(__file__).resolve().parents[2]
DEVICE_PACKAGES = ("splitedge", "edge", "protos")
# signature checks on the device; PyOpenGL drives the GL encoders (es2/es31/gl33) through EGL
EXTRA_REQUIREMENTS = ("cryptography", "PyOpenGL>=3.1")
_SOURCE_SUFFIXES = {".py", ".proto", ".toml", ".json", ".pyi"}


def cache_dir() -> Path:
    """Where built wheels and wheelhouses are kept between flashes."""
    base = os.environ.get("SPLITEDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "splitedge"
    )
    return Path(base)


def source_digest() -> str:
    """sha256 over the device packages' source files and pyproject.toml (what the wheel is built from)."""
    h = hashlib.sha256()
    files = [REPO / "pyproject.toml"]
    for pkg in DEVICE_PACKAGES:
        files += sorted(
            p
            for p in (REPO / pkg).rglob("*")
            if p.suffix in _SOURCE_SUFFIXES and "__pycache__" not in p.parts
        )
    for p in files:
        h.update(p.relative_to(REPO).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _pip(args: list[str], what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        tail = " | ".join(
            [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln][-4:]
        )
        raise SplitedgeError(f"could not {what}: {tail}")


def project_wheel() -> Path:
    """The splitedge wheel for devices, built once per source digest."""
    out = cache_dir() / "wheels" / source_digest()[:16]
    found = sorted(out.glob("splitedge-*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(prefix="splitedge-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy2(REPO / "pyproject.toml", src)
        readme = REPO / "README.md"
        (src / "README.md").write_text(readme.read_text() if readme.is_file() else "splitedge\n")
        for pkg in DEVICE_PACKAGES:
            shutil.copytree(
                REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        build = Path(tmp) / "dist"
        _pip(
            ["wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(build), str(src)],
            "build the splitedge wheel",
        )
        out.mkdir(parents=True, exist_ok=True)
        for whl in build.glob("*.whl"):
            shutil.copy2(whl, out / whl.name)
    return sorted(out.glob("splitedge-*.whl"))[0]


def platform_tags(machine: str, glibc: str) -> list[str]:
    """pip --platform tags a device with this `uname -m` and glibc ('glibc-2.36') can install."""
    arch = {"armv7l": "armv7l", "armv6l": "armv6l"}.get(machine, machine)
    minor = int(glibc.split(".")[-1]) if glibc.startswith("glibc-") else 17
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}", f"linux_{arch}"]


@dataclass
class RuntimePlan:
    """What to carry and what the device's pip installs."""

    key: str
    wheelhouse: Path
    requirements: list[str]  # device-side paths/specs, relative to <root>/wheelhouse for the wheel
    offline: bool
    wheels: list[str]
    wheel_digest: str = ""  # sha256 prefix of the device packages' sources the wheel was built from


def plan_runtime(
    facts: dict[str, Any],
    offline: bool,
    pip_args: list[str] | None = None,
    extra: tuple[str, ...] = (),
) -> RuntimePlan:
    """Build the wheel (and with offline the device's wheelhouse); name the runtime by its content.

    extra: more requirements, e.g. opencv-python-headless for camera and video sources.
    """
    wanted = (*EXTRA_REQUIREMENTS, *extra)
    wheel = project_wheel()
    py = ".".join(facts["python"].split(".")[:2])
    tag = f"{facts['machine']}-cp{py.replace('.', '')}-{facts['glibc'] or 'unknown'}"
    house = cache_dir() / "wheelhouse" / (tag if offline else "online")
    house.mkdir(parents=True, exist_ok=True)
    for old in house.glob("splitedge-*.whl"):
        if old.name != wheel.name:
            old.unlink()
    tmp = house / f".{wheel.name}.{os.getpid()}"
    shutil.copy2(wheel, tmp)
    os.replace(
        tmp, house / wheel.name
    )  # atomic: a flash running beside this one never reads half a wheel
    digest = hashlib.sha256(
        json.dumps([wheel.name, wheel.parent.name, facts["glibc"], pip_args, wanted]).encode()
    )
    marker = house / f".downloaded-{digest.hexdigest()[:16]}"
    if offline and not marker.is_file():
        args = [
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--dest",
            str(house),
            "--python-version",
            py,
            "--implementation",
            "cp",
            "--find-links",
            str(house),
        ]
        for t in platform_tags(facts["machine"], facts["glibc"]):
            args += ["--platform", t]
        _pip(
            args + (pip_args or []) + [f"{house / wheel.name}[edge]", *wanted],
            f"download wheels for {facts['machine']} / Python {py} (is every edge dependency published "
            "for it? add --pip-arg=--extra-index-url=... e.g. piwheels for armv7l)",
        )
        marker.touch()  # same wheel, platform and pip arguments: the next flash skips the download
    wheels = sorted(p.name for p in house.glob("*.whl"))
    requirements = [f"{wheel.name}[edge]", *wanted]
    ident = {
        "python": py,
        "machine": facts["machine"],
        "wheel": wheel.parent.name,
        "offline": offline,
        "requirements": requirements,
        "pip": pip_args or [],
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return RuntimePlan(
        key=key,
        wheelhouse=house,
        requirements=requirements,
        offline=offline,
        wheels=wheels,
        wheel_digest=wheel.parent.name,
    )
