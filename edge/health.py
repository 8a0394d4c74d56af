"""The device's health gate and release check, run by flash before a release goes live and
by `python -m edge.service health|verify` (edge/service.py's command line).

`health`: the bundle's probe frame through the configured encoder backend against the
features export recorded, the service's source opened once, then one real round trip to
the policy server; an llm bundle's gate is its recorded greedy probe instead.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from edge.service import ServiceConfig


def verify_release(release: Path, public_key: Path | None) -> dict[str, Any]:
    """Check the release's bundle hashes (and signature when a key is configured)."""
    from splitedge.bundle import load_bundle

    b = load_bundle(release / "bundle", verify=True, public_key=public_key)
    return {
        "ok": True,
        "bundle": b.name,
        "version": b.version,
        "signature": "verified" if public_key else "not required",
    }


def llm_health(release: Path, out: dict[str, Any]) -> dict[str, Any]:
    """The health gate for an llm bundle: its recorded greedy probe, no server, no service."""
    from edge.llm.probe import check_probe

    t0 = time.monotonic()
    probe = check_probe(release / "bundle")
    probe["seconds"] = round(time.monotonic() - t0, 3)
    out.update(ok=probe["ok"], kind="llm", probe=probe)
    if not probe["ok"]:
        out["error"] = probe.get("error") or "llm probe failed"
    return out


def health(
    release: Path, server: str | None, deadline_s: float = 5.0, local: bool = False
) -> dict[str, Any]:
    """The health gate on the device: probe frame vs expected features, then one real round trip.

    An llm bundle has no control loop: its gate is the recorded greedy probe (llm_health).
    local: only what needs nothing off the device (encoder probe, source), no round trip.
    """
    import numpy as np

    from edge.client import ClientConfig, PolicyClient
    from splitedge.bundle import load_bundle, read_manifest
    from splitedge.errors import SplitedgeError

    out: dict[str, Any] = {
        "ok": False,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "release": release.resolve().name,
    }
    if read_manifest(release / "bundle")["kind"] == "llm":
        return llm_health(release, out)
    cfg = ServiceConfig.load(release / "service.json")
    bundle = load_bundle(cfg.bundle)
    probe = np.load(release / "probe.npz")
    frame, expected, tol = probe["frame"], probe["features"], int(probe["tolerance_lsb"])
    # one LSB in feature units: 1 for uint8 features, a float32 bundle's probe records its own
    step = float(probe["step"]) if "step" in probe.files else 1.0
    client = PolicyClient(
        bundle,
        ClientConfig(
            server=server or cfg.server,
            backend=cfg.backend,
            deadline_s=deadline_s,
            rpc="unary",
            security=cfg.security(),
        ),
    )
    try:
        assert client.encoder is not None
        got = client.encoder.encode(frame[None])[0]
        if got.dtype != expected.dtype:
            out["encoder"] = {"backend": client.encoder_reason, "ok": False}
            out["error"] = (
                f"encoder gives {got.dtype} features, the bundle's are {expected.dtype}; "
                "use a backend that supports this bundle (ort always does)"
            )
            return out
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64)) / step
        worst = float(diff.max())  # NaN from a broken backend fails the check below
        out["encoder"] = {
            "backend": client.encoder_reason,
            "max_diff_lsb": int(worst) if expected.dtype == np.uint8 else round(worst, 2),
            "values_off": int(np.count_nonzero(diff >= 1)),
            "tolerance_lsb": tol,
            "ok": bool(worst <= tol),
        }
        if not out["encoder"]["ok"]:
            out["error"] = (
                "encoder output differs from the expected features by up to "
                f"{out['encoder']['max_diff_lsb']} LSB (> {tol})"
            )
            if cfg.backend == "es2":  # 8-bit activations: exact only within the calibration
                out["error"] += (
                    " on es2, whose 8-bit activations hold only the value ranges the bundle was "
                    "calibrated on; flash with --backend ort for the exact encoder, or export "
                    "with frames like this source's"
                )
            return out
        if cfg.source.get("kind", "env") == "env":  # the env must start here, as in the service
            from edge.sources import open_source

            try:
                cfg.use_packages()
                source = open_source(cfg.source, bundle.policy)
                source.close()
                out["source"] = {"ok": True, "name": source.name}
            except SplitedgeError as e:
                out["source"] = {"ok": False}
                out["error"] = f"the service's source cannot start: {e}"
                return out
        if local:
            out["ok"] = True
            return out
        try:
            _reachable(client.config.server)
            client.connect()
        except (
            ConnectionError,
            OSError,
            SplitedgeError,
        ) as e:  # unreachable, or it refused the bundle
            out["round_trip"] = {"ok": False, "server": client.config.server}
            out["error"] = f"policy server {client.config.server}: {e}"
            return out
        action = client.act(frame)
        d = client.last
        assert d is not None
        out["round_trip"] = {
            "ok": not d.fallback,
            "server": client.config.server,
            "action": _plain(action),
            "rtt_ms": round(d.rtt_ms, 3),
            "error": d.error,
        }
        if d.fallback:
            out["error"] = f"round trip to {client.config.server} failed: {d.error}"
            return out
        out["ok"] = True
        return out
    finally:
        client.close()


def _reachable(server: str, timeout_s: float = 3.0) -> None:
    """Fail fast with the socket's own reason (refused, no route) before gRPC's longer wait."""
    host, _, port = server.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
        pass


def _plain(action: Any) -> Any:
    return action.tolist() if hasattr(action, "tolist") else action
