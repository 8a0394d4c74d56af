"""`splitedge flash`: pre-flight, copy, verify, install, switch, health gate; roll back on any failure.

Nothing on the device changes until the bundle has been copied, hash-checked
and (with a key configured) signature-checked there; `current` then moves in one
rename. Every failure after that switch rolls back to the previous release.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.flash import preflight
from deploy.flash.transport import DeviceRefused, Target, Transport, parse_result
from splitedge.errors import SplitedgeError

Log = Callable[[str], None]


@dataclass
class FlashOptions:
    """Everything one flash needs; the CLI and the fleet runner both build one."""

    host: str
    bundle: Path
    profile: str | None = None
    server: str | None = None
    root: str | None = None  # None: the device's $SPLITEDGE_ROOT or /opt/splitedge
    offline: bool = False
    public_key: Path | None = None
    source: str = "env"
    env_kwargs: dict[str, Any] | None = None  # for an env source; None: the bundle's recorded
    sink: str = "socket"
    service: dict[str, Any] = field(
        default_factory=dict
    )  # extra service.json keys (rate_hz, backend...)
    ssh_config: Path | None = None
    ssh_options: list[str] = field(default_factory=list)
    device_python: str = "python3"
    bwlimit_kbps: int | None = None
    pip_args: list[str] = field(default_factory=list)
    env_packages: list[Path] = field(default_factory=list)  # the user's env code (env_package.py)

    def transport(self) -> Transport:
        return Transport(
            Target.parse(self.host),
            ssh_config=self.ssh_config,
            ssh_options=list(self.ssh_options),
            device_python=self.device_python,
        )


class _Steps:
    """Collects (step, result, seconds) rows and reports each as it finishes."""

    def __init__(self, log: Log):
        self.rows: list[dict[str, Any]] = []
        self.log = log
        self._t = time.monotonic()

    def done(self, step: str, detail: str) -> None:
        now = time.monotonic()
        self.rows.append({"step": step, "result": detail, "seconds": round(now - self._t, 2)})
        self.log(f"  {step:<12} {detail}  ({now - self._t:.1f} s)")
        self._t = now


def dry_run_plan(opts: FlashOptions) -> list[dict[str, str]]:
    """The steps and the exact commands a flash would run, without contacting the device."""
    from splitedge.bundle import read_manifest

    t = opts.transport()
    root = opts.root or "<root>"  # the device's $SPLITEDGE_ROOT, else /opt/splitedge: only it knows
    try:
        manifest = read_manifest(Path(opts.bundle))
        rel = f"{manifest['name']}-{manifest['version']}"
    except SplitedgeError:
        rel = "<name>-<version>"
    py = f"{root}/runtimes/<key>/venv/bin/python"
    return [
        {
            "step": "load",
            "command": f"verify {opts.bundle} hashes"
            + (f" and signature ({opts.public_key})" if opts.public_key else ""),
        },
        {
            "step": "pre-flight",
            "command": shlex.join(t.ssh_argv([opts.device_python, "-", "facts"])) + "  < remote.py",
            "checks": f"profile {opts.profile or '(none: generic checks)'}"
            + (" and the encoder's fit to its GPU limits (here, first)" if opts.profile else ""),
        },
        {
            "step": "package",
            "command": "build splitedge wheel (edge, protos, splitedge only)"
            + (", pip download every dependency for the device's platform" if opts.offline else "")
            + "; probe features with encoder.onnx; service.json; systemd unit"
            + " (an llm bundle: none of these, its probe is in the manifest)",
        },
        {
            "step": "transfer",
            "command": shlex.join(
                t.rsync_argv(Path("<wheelhouse>"), f"{root}/wheelhouse", opts.bwlimit_kbps)
            ),
        },
        {
            "step": "transfer",
            "command": shlex.join(
                t.rsync_argv(Path("<release>"), f"{root}/incoming/{rel}", opts.bwlimit_kbps)
            ),
        },
        {"step": "stage", "command": f"hash-check incoming/{rel}, rename it to releases/{rel}"},
        {
            "step": "runtime",
            "command": f"python3 -m venv {root}/runtimes/<key>/venv; pip install "
            + ("--no-index " if opts.offline else "")
            + f"--find-links {root}/wheelhouse splitedge[edge] cryptography"
            + (
                f"; pip install --no-deps --target releases/{rel}/packages "
                + " ".join(f"<{p}>" for p in opts.env_packages)
                if opts.env_packages
                else ""
            ),
        },
        {
            "step": "verify",
            "command": f"{py} -m edge.service verify --release {root}/releases/{rel}"
            + " [--public-key etc/signing.pub]",
        },
        {
            "step": "switch",
            "command": f"ln -sfn releases/{rel} .current.tmp && mv -T .current.tmp current; "
            "restart systemd unit or supervisor",
        },
        {
            "step": "health",
            "command": f"{py} -m edge.service health --release {root}/current"
            + f" (server {opts.server or 'from the current release'}; an llm bundle: its greedy "
            "probe, no server); on failure: roll back",
        },
    ]


def flash(opts: FlashOptions, log: Log = lambda s: None) -> dict[str, Any]:
    """Flash one device; returns the report. Raises SplitedgeError (after rolling back) on failure."""
    from deploy.flash.package import parse_sink, parse_source, stage_release
    from deploy.flash.runtime import plan_runtime
    from splitedge.bundle import load_bundle
    from splitedge.signing import public_key_line

    steps = _Steps(log)
    t = opts.transport()
    bundle = load_bundle(opts.bundle, verify=True, public_key=opts.public_key)
    release = f"{bundle.name}-{bundle.version}"
    source, sink = parse_source(opts.source), parse_sink(opts.sink)
    if opts.env_kwargs is not None:
        if source["kind"] != "env":
            raise SplitedgeError(f"--env-kwargs is for an env source, not --source {opts.source}")
        source["env_kwargs"] = dict(opts.env_kwargs)
    wheels = _env_wheels(opts, bundle, source)
    steps.done("load", f"{release}: hashes ok" + (", signature ok" if opts.public_key else ""))

    llm = bundle.kind == "llm"  # no control loop: no server, no service, a greedy-decode probe
    req = preflight.requirements(opts.profile) if opts.profile else None
    # the encoder's fit is the bundle's and the profile's business: checked before any contact
    encoder_row = None
    if req and not llm:
        try:
            encoder_row = preflight.encoder_check(opts.profile, bundle.root)
        except SplitedgeError as e:
            raise SplitedgeError(
                f"pre-flight failed on {t.target}, nothing was changed: {e}"
            ) from e
    facts = t.op("facts", opts.root, timeout_s=60)
    root = facts["root"]
    rows, problems = preflight.check(facts, req)
    rows += [encoder_row] if encoder_row else []
    key_line = public_key_line(opts.public_key) if opts.public_key else None
    if (
        key_line
        and facts["trusted_key"]
        and facts["trusted_key"].split()[:2] != key_line.split()[:2]
    ):
        problems.append(f"the device trusts a different signing key ({root}/etc/signing.pub)")
    server = None if llm else opts.server or facts["current_server"]
    if not server and not llm:
        problems.append(
            "no policy server: pass --server HOST:PORT (the device has no previous release to take it from)"
        )
    if problems:
        raise SplitedgeError(
            f"pre-flight failed on {t.target}, nothing was changed: " + "; ".join(problems)
        )
    steps.done(
        "pre-flight",
        f"{facts['arch']}, Python {facts['python']}, root {root}, "
        f"{'systemd' if facts['systemd'] else 'supervisor (' + facts['systemd_reason'] + ')'}",
    )

    with tempfile.TemporaryDirectory(prefix="splitedge-flash-") as tmp:
        info = stage_release(
            bundle, Path(tmp) / release, root, server, source, sink, opts.service, wheels
        )
        camera = (
            ("opencv-python-headless",) if not llm and source["kind"] in ("camera", "video") else ()
        )
        runtime = plan_runtime(facts, opts.offline, opts.pip_args, extra=camera)
        steps.done(
            "package",
            f"probe {info['probe']['probe']}; {len(runtime.wheels)} wheel(s)"
            + (f", env package(s) {', '.join(w.name for w in wheels)}" if wheels else "")
            + (" (offline)" if opts.offline else " (deps from the device's index)"),
        )
        t.op("prepare", root, release=release)
        t.copy(runtime.wheelhouse, f"{root}/wheelhouse", opts.bwlimit_kbps)
        t.copy(Path(tmp) / release, f"{root}/incoming/{release}", opts.bwlimit_kbps)
    steps.done("transfer", f"to {root}/incoming/{release}")

    staged = t.op("stage", root, release=release)
    steps.done(
        "stage",
        "hashes match on the device" + (" (already staged)" if staged["already_staged"] else ""),
    )
    rt = t.op(
        "runtime",
        root,
        release=release,
        key=runtime.key,
        python=opts.device_python,
        offline=runtime.offline,
        requirement=[
            f"{root}/wheelhouse/{r}" if r.endswith("[edge]") else r for r in runtime.requirements
        ],
        pip_arg=opts.pip_args,
        timeout_s=1800,
    )
    python = rt["python"]
    steps.done(
        "runtime",
        ("installed " if rt["installed"] else "reused ")
        + f"runtimes/{runtime.key} ({rt['seconds']:.1f} s)"
        + (f"; env packages {', '.join(rt['env_packages'])}" if rt.get("env_packages") else ""),
    )

    if key_line:
        t.op("trust-key", root, key=key_line)
    trusted = bool(key_line or facts["trusted_key"])
    verify = [python, "-m", "edge.service", "verify", "--release", f"{root}/releases/{release}"]
    try:
        parse_result(
            t.run(
                verify + (["--public-key", f"{root}/etc/signing.pub"] if trusted else []),
                check=False,
            ),
            "verify on the device",
        )
    except DeviceRefused as e:
        if not staged["already_staged"]:
            t.op("discard", root, release=release)
        raise SplitedgeError(
            f"{e}; the release was refused and nothing was switched "
            f"(current is still {facts['current'] or 'empty'})"
        ) from e
    steps.done(
        "verify", "hashes" + (" and signature" if trusted else "") + " ok with the edge runtime"
    )

    switched = t.op("switch", root, release=release)
    steps.done(
        "switch",
        f"current -> {release} (was {switched['previous'] or 'empty'}); {switched['service']}",
    )
    gate = health_gate(t, root, python, server, llm=llm)
    if not gate["ok"] and switched["previous"] == release:
        raise SplitedgeError(
            f"health gate failed on {t.target}: {gate.get('error')}. {release} was already "
            "current before this flash, so there is nothing to roll back to; it stays current"
        )
    if not gate["ok"]:
        back = t.op("rollback", root, allow_empty=True, restore_previous=facts["previous"] or "-")
        restored = back["current"]
        after = health_of_current(t, root) if restored else {"ok": None}
        steps.done(
            "rollback",
            f"to {restored or 'nothing (first flash)'}"
            + (
                f", its health {'ok' if after['ok'] else 'FAILED: ' + str(after.get('error'))}"
                if restored
                else ""
            ),
        )
        raise SplitedgeError(
            f"health gate failed on {t.target}: {gate.get('error')}. Rolled back automatically: "
            f"current is {restored or 'empty (this was the first flash)'}, {back['service']}"
        )
    steps.done("health", health_summary(gate))
    return {
        "host": str(t.target),
        "release": release,
        "root": root,
        "previous": switched["previous"],
        "preflight": rows,
        "steps": steps.rows,
        "health": gate,
        "runtime": runtime.key,
        "wheel": runtime.wheel_digest,
        "ok": True,
    }


def _env_wheels(opts: FlashOptions, bundle: Any, source: dict[str, Any]) -> list[Path]:
    """Wheels of the user's env code to carry (--env-package), built here before any contact."""
    if not opts.env_packages:
        return []
    if bundle.kind != "policy" or source["kind"] != "env":
        raise SplitedgeError(
            f"--env-package is for a policy bundle with an env source, not --source {opts.source}"
        )
    from deploy.flash.env_package import env_wheels

    recorded = bundle.policy.get("env") or {}
    env = source.get("env") or recorded.get("id") or bundle.policy.get("task")
    return env_wheels(list(opts.env_packages), env)


def _device_health(t: Transport, root: str, python: str, server: str | None) -> dict[str, Any]:
    argv = [
        python,
        "-m",
        "edge.service",
        "health",
        "--release",
        f"{root}/current",
        "--out",
        f"{root}/state/health.json",
    ]
    r = t.run(argv + (["--server", server] if server else []), timeout_s=120, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {
            "ok": False,
            "error": f"health check did not run (exit {r.returncode}): {r.stderr.strip()[-300:]}",
        }
    import json

    return dict(json.loads(lines[-1]))


def health_summary(gate: dict[str, Any]) -> str:
    """One line on a passed health gate, for the steps table."""
    if gate.get("kind") == "llm":
        p = gate["probe"]
        if p["check"] == "probe":
            return (
                f"greedy probe {len(p['got_ids'])} ids after {p['prompt_tokens']} prompt tokens "
                f"match exactly, tokenizer ok ({p['seconds']:.1f} s); no service (llm bundle)"
            )
        return f"{p['note']}: {p['logits']} finite logits; no service (llm bundle)"
    enc, rtt = gate["encoder"], gate["round_trip"]
    return (
        f"probe max diff {enc['max_diff_lsb']} LSB (tol {enc['tolerance_lsb']}); "
        f"round trip to {rtt['server']} {rtt['rtt_ms']:.1f} ms, action {rtt['action']}; "
        f"service {gate['service']}"
    )


def health_gate(
    t: Transport,
    root: str,
    python: str,
    server: str | None,
    settle_s: float = 0.5,
    llm: bool = False,
) -> dict[str, Any]:
    """Probe + round trip on the device, then make sure the restarted service is still up.

    llm: the bundle's greedy probe only; it has no server and no service to check.
    """
    gate = _device_health(t, root, python, server)
    if not gate["ok"] or llm:
        return gate
    time.sleep(settle_s)  # a service that cannot start (no camera) exits within this
    service = t.op("status", root)["service"]
    gate["service"] = service.get("active")
    if service.get("active") != "active" or service.get("state") == "failed":
        gate["ok"] = False
        gate["error"] = (
            f"the service did not stay up: {service.get('error') or service.get('active')}"
        )
    return gate


def health_of_current(t: Transport, root: str) -> dict[str, Any]:
    """Run the health check of whatever release is current, with that release's own runtime."""
    return _device_health(t, root, f"{root}/current/runtime/venv/bin/python", None)


def rollback_device(t: Transport, root: str | None) -> dict[str, Any]:
    """`splitedge rollback`: swap current and previous on the device, restart, check health."""
    back = t.op("rollback", root)
    facts_root = back.get("root") or root or t.op("facts", root, timeout_s=60)["root"]
    health = health_of_current(t, facts_root)
    return {
        "host": str(t.target),
        "current": back["current"],
        "rolled_back_from": back["rolled_back_from"],
        "service": back["service"],
        "health": health,
    }
