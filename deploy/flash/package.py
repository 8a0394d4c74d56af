"""What one release carries: the bundle as is, the health probe, the service config and unit.

(An llm release: the bundle and release.json; its probe is in the bundle's manifest.)
"""

from __future__ import annotations

import json
import shutil
import socket
import string
import time
from pathlib import Path
from typing import Any

from deploy.flash.env_package import sha256
from deploy.flash.probe import write_probe
from deploy.flash.transport import device_script
from splitedge import __version__
from splitedge.bundle import SIGNATURE, Bundle
from splitedge.errors import SplitedgeError

UNIT_TEMPLATE = Path(__file__).resolve().parents[1] / "systemd" / "splitedge.service.in"


def parse_source(text: str) -> dict[str, Any]:
    """--source env[:ID_OR_ENTRY_POINT] | camera[:DEVICE] | video:PATH -> the config's source table."""
    kind, _, arg = text.partition(":")
    if kind == "env":
        return {"kind": "env", **({"env": arg} if arg else {})}
    if kind == "camera":
        return {"kind": "camera", "device": arg or "/dev/video0"}
    if kind == "video" and arg:
        return {"kind": "video", "path": arg, "loop": True}
    raise SplitedgeError(
        f"--source {text!r}: use env[:ID_OR_ENTRY_POINT], camera[:/dev/videoN] or video:PATH"
    )


def parse_sink(text: str) -> dict[str, Any]:
    """--sink socket[:PATH] | entrypoint:MODULE:FUNCTION | log -> the config's sink table."""
    kind, _, arg = text.partition(":")
    if kind == "socket":
        return {"kind": "socket", **({"path": arg} if arg else {})}
    if kind == "entrypoint" and ":" in arg:
        return {"kind": "entrypoint", "entrypoint": arg}
    if kind == "log" and not arg:
        return {"kind": "log"}
    raise SplitedgeError(
        f"--sink {text!r}: use socket[:PATH], entrypoint:package.module:function or log"
    )


def service_config(
    root: str,
    server: str,
    source: dict[str, Any],
    sink: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """service.json for edge.service: paths relative to the release folder, state under the root.

    The device settings in it (edge.service.DEVICE_SETTINGS) are this flash's defaults; the
    device config it names (<root>/etc/device.json, written at the switch) overrides them.
    """
    cfg = {
        "bundle": "bundle",
        "server": server,
        "source": source,
        "sink": sink,
        "state_dir": f"{root}/state",
        "run_dir": f"{root}/run",
        "device_config": f"{root}/etc/device.json",
    }
    cfg.update(extra or {})
    return cfg


def device_settings(release_config: dict[str, Any]) -> dict[str, Any]:
    """The device config a flash writes (etc/device.json): the settings part of service.json."""
    from edge.service import DEVICE_SETTINGS

    return {k: v for k, v in release_config.items() if k in DEVICE_SETTINGS}


def render_unit(root: str) -> str:
    """The systemd unit for an install root (deploy/systemd/splitedge.service.in)."""
    return string.Template(UNIT_TEMPLATE.read_text()).substitute(root=root)


def llm_probe_summary(bundle: Bundle) -> dict[str, Any]:
    """What the device's health gate will check for an llm bundle (recorded by `llm fold`)."""
    probe = bundle.manifest["llm"].get("health_probe")
    if not probe:
        return {"probe": "none recorded in the bundle: one decoder step must give finite logits"}
    return {
        "probe": f"{len(probe['expected_ids'])} greedy ids after a "
        f"{len(probe['prompt_ids'])}-token prompt, exact",
        "expected_ids": probe["expected_ids"],
    }


def stage_release(
    bundle: Bundle,
    out: Path,
    root: str,
    server: str | None,
    source: dict[str, Any],
    sink: dict[str, Any],
    extra: dict[str, Any] | None = None,
    wheels: list[Path] | None = None,
) -> dict[str, Any]:
    """Write the release folder to copy: bundle/, probe.npz, service.json, release.json, splitedge.service.

    wheels: the user's env packages (flash --env-package), carried in wheels/ and listed with
    their sha256 in service.json's env_wheels. An llm release carries bundle/ and release.json only.
    """
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle.root, out / "bundle", dirs_exist_ok=True)
    sig = out / "bundle" / SIGNATURE
    if sig.exists() and not (bundle.root / SIGNATURE).exists():
        sig.unlink()
    if bundle.kind == "llm":  # no control loop: no service, no server; the probe is in the manifest
        probe = llm_probe_summary(bundle)
    else:
        if not server:
            raise SplitedgeError("a policy bundle needs a policy server: pass --server HOST:PORT")
        probe = write_probe(bundle, out / "probe.npz", source)
        carried = {}
        for whl in wheels or []:
            (out / "wheels").mkdir(exist_ok=True)
            shutil.copy2(whl, out / "wheels" / whl.name)
            carried[f"wheels/{whl.name}"] = sha256(whl)
        extra = {**(extra or {}), **({"env_wheels": carried} if carried else {})}
        (out / "service.json").write_text(
            json.dumps(service_config(root, server, source, sink, extra), indent=2)
        )
        (out / "splitedge.service").write_text(render_unit(root))
        # the device script, kept with the release for the unit's boot-time check
        (out / "device.py").write_text(device_script())
    info = {
        "kind": bundle.kind,
        "bundle": bundle.name,
        "version": bundle.version,
        "signed": (bundle.root / SIGNATURE).exists(),
        "flashed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "flashed_from": socket.gethostname(),
        "splitedge": __version__,
        "probe": probe,
    }
    (out / "release.json").write_text(json.dumps(info, indent=2))
    return info
