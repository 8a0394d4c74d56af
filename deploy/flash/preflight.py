"""Pre-flight: compare what the device reports (remote.py facts) with its profile's requirements."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REQUIREMENTS = Path(__file__).with_name("requirements.toml")
DEVICE_PROFILES = Path(__file__).resolve().parents[1] / "devices"
KEYS = ("arch", "python_min", "ram_mb", "ram_min_mb", "disk_min_mb", "gles_min")


@dataclass(frozen=True)
class Requirements:
    """What one device profile needs before a flash may start."""

    profile: str
    arch: tuple[str, ...]
    python_min: str
    ram_mb: int
    ram_min_mb: int
    disk_min_mb: int
    gles_min: str | None = None


def profiles() -> list[str]:
    """Profile names known to pre-flight."""
    return sorted(tomllib.loads(REQUIREMENTS.read_text()))


def requirements(profile: str) -> Requirements:
    """The requirements of a profile: requirements.toml, overridden by deploy/devices/<profile>.toml keys."""
    table = tomllib.loads(REQUIREMENTS.read_text())
    if profile not in table:
        raise SplitedgeError(
            f"unknown device profile {profile!r}; known: {', '.join(sorted(table))}"
        )
    merged = dict(table[profile])
    device_file = DEVICE_PROFILES / f"{profile}.toml"
    if device_file.is_file():
        merged.update(
            {k: v for k, v in tomllib.loads(device_file.read_text()).items() if k in KEYS}
        )
    return Requirements(
        profile=profile,
        arch=tuple(merged["arch"]),
        python_min=str(merged["python_min"]),
        ram_mb=int(merged["ram_mb"]),
        ram_min_mb=int(merged["ram_min_mb"]),
        disk_min_mb=int(merged["disk_min_mb"]),
        gles_min=merged.get("gles_min"),
    )


def _version(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def check(
    facts: dict[str, Any], req: Requirements | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (check, device, needs, ok) for the report, and the problems that must stop the flash."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []

    def row(name: str, have: Any, need: Any, ok: bool | None, fix: str = "") -> None:
        rows.append(
            {
                "check": name,
                "device": have,
                "needs": need,
                "ok": "yes" if ok else ("not checked" if ok is None else "NO"),
            }
        )
        if ok is False:
            problems.append(
                f"{name}: device has {have}, needs {need}" + (f" ({fix})" if fix else "")
            )

    arch = facts["arch"] + (
        f" (emulated on {facts['machine']})" if facts["arch"] != facts["machine"] else ""
    )
    python_ok = _version(facts["python"]) >= _version(req.python_min if req else "3.10")
    row(
        "python",
        facts["python"],
        f">= {req.python_min if req else '3.10'}",
        python_ok,
        "install a newer python3 and pass --device-python",
    )
    row(
        "python venv",
        "yes" if facts["venv"] else "no",
        "yes",
        bool(facts["venv"]),
        "on Debian/Raspberry Pi OS: sudo apt install python3-venv",
    )
    row(
        "rsync on device",
        "yes" if facts["rsync"] else "no",
        "yes",
        bool(facts["rsync"]),
        "sudo apt install rsync",
    )
    row(
        "install root writable",
        facts["root"],
        "writable",
        bool(facts["root_writable"]),
        f"run once on the device: sudo install -d -o {facts['user']} {facts['root']}, or pass --root ~/splitedge",
    )
    if req is None:
        return rows, problems
    row(
        "cpu architecture",
        arch,
        " or ".join(req.arch),
        facts["arch"] in req.arch,
        f"is this a {req.profile}? pick the matching --profile",
    )
    ram = (
        min(v for v in (facts["ram_total_mb"], facts["ram_limit_mb"]) if v)
        if facts["ram_total_mb"]
        else 0
    )
    ram_text = f"{ram} MB" + (
        " (cgroup limit)"
        if facts["ram_limit_mb"] and facts["ram_limit_mb"] < facts["ram_total_mb"]
        else ""
    )
    row("ram", ram_text, f">= {req.ram_min_mb} MB", ram >= req.ram_min_mb)
    row(
        "free disk",
        f"{facts['disk_free_mb']} MB at {facts['disk_path']}",
        f">= {req.disk_min_mb} MB",
        facts["disk_free_mb"] >= req.disk_min_mb,
        "free some space or pass --root on a bigger disk",
    )
    if req.gles_min:
        gl = facts.get("gl")
        gl_ok = (
            None if not gl else ("OpenGL ES" not in gl or _version(gl) >= _version(req.gles_min))
        )
        row(
            "OpenGL ES",
            gl or "unknown (no eglinfo/glxinfo on the device)",
            f">= {req.gles_min}",
            gl_ok,
        )
    return rows, problems


def encoder_check(profile: str, bundle_root: Path) -> dict[str, Any]:
    """The report row for a policy bundle's encoder under the device profile's GPU limits
    (deploy.devices.check_encoder: planned here, no GL context, no device contact).

    Raises SplitedgeError naming the layer, the limit and the number when it cannot run there.
    """
    from deploy.devices import check_encoder, load_profile

    try:
        fits = check_encoder(load_profile(profile), bundle_root)
    except SplitedgeError as e:
        raise SplitedgeError(
            f"the bundle's encoder cannot run on {profile}: {e}; export one that fits "
            f"(splitedge export --profile {profile})"
        ) from e
    return {"check": "encoder limits", "device": fits, "needs": f"{profile} limits", "ok": "yes"}


BACKENDS = ("auto", "ort", "gl33", "es31", "es2")
# what each GL target needs from the device's dynamic loader, and the Debian / Raspberry Pi OS
# packages that have it (Mesa's drivers come with libgl1-mesa-dri)
GL_LIBRARIES = {"gl33": ("EGL", "GL"), "es31": ("EGL", "GLESv2"), "es2": ("EGL", "GLESv2")}
APT_PACKAGES = {"EGL": "libegl1", "GLESv2": "libgles2", "GL": "libgl1"}
# a board runs its own GL target and the simpler ones
RUNS_ON = {"gl33": ("gl33", "es31", "es2"), "es31": ("es31", "es2"), "es2": ("es2",)}


def check_backend(requested: str, profile: str | None) -> str | None:
    """Refuse an unknown --backend, or a GL target the profile's GPU cannot run, before any
    contact; returns the profile's GL target (None without a profile)."""
    if requested not in BACKENDS:
        raise SplitedgeError(f"unknown --backend {requested!r}; choose from {', '.join(BACKENDS)}")
    if not profile:
        return None
    from deploy.devices import load_profile

    target = load_profile(profile).gl_target
    if requested in RUNS_ON and requested not in RUNS_ON[target]:
        raise SplitedgeError(
            f"--backend {requested} cannot run on {profile}: its GPU's GL target is {target}; "
            f"use --backend {target}, ort or auto"
        )
    return target


def resolve_backend(
    requested: str, profile: str | None, facts: dict[str, Any]
) -> tuple[str, str, dict[str, Any] | None, str | None]:
    """(backend, why, report row, problem) for the service and its health gate on this device.

    auto with a profile: the profile's GL target when the device has its GL libraries, else
    onnxruntime (saying which package would enable GL); without a profile the device decides.
    """
    target = check_backend(requested, profile)
    gl = requested if requested in GL_LIBRARIES else target if requested == "auto" else None
    if gl is None:
        why = "requested" if requested == "ort" else "auto: chosen on the device (no --profile)"
        return requested, why, None, None
    libs = facts.get("gl_libraries") or {}
    needed = GL_LIBRARIES[gl]
    missing = [n for n in needed if not libs.get(n)]
    apt = "sudo apt install " + " ".join(APT_PACKAGES[n] for n in missing) + " libgl1-mesa-dri"
    row = {
        "check": f"GL libraries ({gl})",
        "device": ", ".join(str(libs[n]) for n in needed if libs.get(n)) or "none",
        "needs": " and ".join(f"lib{n}" for n in needed),
        "ok": "yes" if not missing else ("NO" if requested != "auto" else "no: ort instead"),
    }
    names = " and ".join(f"lib{n}" for n in missing)
    if missing and requested != "auto":
        return requested, "", row, f"--backend {requested} needs {names} on the device: {apt}"
    if missing:
        return "ort", f"auto: no {names} on the device, so onnxruntime ({apt} for {gl})", row, None
    if requested == "auto":
        return gl, f"auto: {profile}'s GL target, its GL libraries are on the device", row, None
    return gl, "requested", row, None
