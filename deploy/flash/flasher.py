"""`splitedge flash`: pre-flight, copy, verify, install, switch, health gate, commit.

Nothing on the device changes until the bundle has been copied, hash-checked
and (with a key configured) signature-checked there; `current` then moves in one
rename, and the release is pending: the device reverts it by itself unless the
health gate passes and this side confirms it within the commit deadline (gate.py,
device_commit.py). A failed gate reverts at once.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.flash import preflight
from deploy.flash.gate import confirm, health_of_current, health_summary
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
    commit_deadline_s: float = 120.0  # the device reverts a switched release not confirmed by then

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


@dataclass
class LocalChecks:
    """What every check that needs no device found (check_locally)."""

    bundle: Any
    release: str
    llm: bool
    source: dict[str, Any]
    sink: dict[str, Any]
    wheels: list[Path]
    req: preflight.Requirements | None
    rows: list[dict[str, Any]]
    key_line: str | None


def check_locally(opts: FlashOptions) -> LocalChecks:
    """Bundle hashes (and signature with --public-key), profile, backend, the encoder's fit to
    the profile, source, sink and env packages: all before any contact with the device."""
    from deploy.flash.package import parse_sink, parse_source
    from splitedge.bundle import load_bundle
    from splitedge.signing import public_key_line

    opts.transport()  # --host is well formed
    if not 0 < opts.commit_deadline_s <= 86400:
        raise SplitedgeError(
            f"--commit-deadline {opts.commit_deadline_s:g}: give 1..86400 seconds (default 120)"
        )
    req = preflight.requirements(opts.profile) if opts.profile else None
    bundle = load_bundle(opts.bundle, verify=True, public_key=opts.public_key)
    llm = bundle.kind == "llm"  # no control loop: no server, no service, a greedy-decode probe
    source, sink = parse_source(opts.source), parse_sink(opts.sink)
    if opts.env_kwargs is not None:
        if source["kind"] != "env":
            raise SplitedgeError(f"--env-kwargs is for an env source, not --source {opts.source}")
        source["env_kwargs"] = dict(opts.env_kwargs)
    rows = []
    if not llm:
        preflight.check_backend(str(opts.service.get("backend", "auto")), opts.profile)
        if opts.profile:  # the encoder's fit is the bundle's and the profile's business
            try:
                rows.append(preflight.encoder_check(opts.profile, bundle.root))
            except SplitedgeError as e:
                raise SplitedgeError(
                    f"pre-flight failed on {opts.host}, nothing was changed: {e}"
                ) from e
    return LocalChecks(
        bundle=bundle,
        release=f"{bundle.name}-{bundle.version}",
        llm=llm,
        source=source,
        sink=sink,
        wheels=_env_wheels(opts, bundle, source),
        req=req,
        rows=rows,
        key_line=public_key_line(opts.public_key) if opts.public_key else None,
    )


def check_device(
    opts: FlashOptions, c: LocalChecks, facts: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str], str | None, dict[str, Any]]:
    """Pre-flight against what the device reported: (rows, problems, server, service config)."""
    rows, problems = preflight.check(facts, c.req)
    rows += c.rows
    if c.key_line and facts["trusted_key"]:
        if facts["trusted_key"].split()[:2] != c.key_line.split()[:2]:
            problems.append(
                f"the device trusts a different signing key ({facts['root']}/etc/signing.pub)"
            )
    server = None if c.llm else opts.server or facts["current_server"]
    if not server and not c.llm:
        problems.append(
            "no policy server: pass --server HOST:PORT (the device has no previous release to take it from)"
        )
    pending = facts.get("pending")
    if pending:
        problems.append(
            f"{pending['release']} is pending on the device since {pending['started_at']} (an "
            f"interrupted flash?); it reverts by itself at {pending['deadline_at']}: wait for "
            "that, or run `splitedge rollback` to revert it now"
        )
    service = dict(opts.service)
    if not c.llm:
        backend, why, row, problem = preflight.resolve_backend(
            str(service.get("backend", "auto")), opts.profile, facts
        )
        rows += [row] if row else []
        problems += [problem] if problem else []
        service.update(backend=backend, backend_reason=why)
    return rows, problems, server, service


def flash(
    opts: FlashOptions, log: Log = lambda s: None, progress: Log | None = None
) -> dict[str, Any]:
    """Flash one device; returns the report. Raises SplitedgeError (after rolling back) on failure.

    progress: called with rsync's overall progress lines during the transfer."""
    from deploy.flash.package import device_settings, stage_release
    from deploy.flash.runtime import plan_runtime

    steps = _Steps(log)
    t = opts.transport()
    c = check_locally(opts)
    bundle, release, llm, wheels = c.bundle, c.release, c.llm, c.wheels
    steps.done("load", f"{release}: hashes ok" + (", signature ok" if opts.public_key else ""))
    facts = t.op("facts", opts.root, timeout_s=60)
    root = facts["root"]
    rows, problems, server, service = check_device(opts, c, facts)
    if problems:
        raise SplitedgeError(
            f"pre-flight failed on {t.target}, nothing was changed: " + "; ".join(problems)
        )
    steps.done(
        "pre-flight",
        f"{facts['arch']}, Python {facts['python']}"
        + (f" ({facts['python_abi']})" if facts.get("python_abi") else "")
        + f", root {root}, "
        f"{'systemd' if facts['systemd'] else 'supervisor (' + facts['systemd_reason'] + ')'}"
        + (f"; backend {service['backend']} ({service['backend_reason']})" if not llm else ""),
    )
    source, sink = c.source, c.sink

    with tempfile.TemporaryDirectory(prefix="splitedge-flash-") as tmp:
        info = stage_release(
            bundle, Path(tmp) / release, root, server, source, sink, service, wheels
        )
        config = None
        if not llm:  # the device's settings: etc/device.json, switched with the release
            config = device_settings(json.loads((Path(tmp) / release / "service.json").read_text()))
            kept = facts.get("device_config") or {}
            if kept.get("token_file"):
                config.setdefault("token_file", kept["token_file"])
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
        t.copy(runtime.wheelhouse, f"{root}/wheelhouse", opts.bwlimit_kbps, progress)
        t.copy(Path(tmp) / release, f"{root}/incoming/{release}", opts.bwlimit_kbps, progress)
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

    if c.key_line:
        t.op("trust-key", root, key=c.key_line)
    trusted = bool(c.key_line or facts["trusted_key"])
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

    switched = t.op(
        "switch",
        root,
        release=release,
        deadline=opts.commit_deadline_s,
        config=json.dumps(config) if config is not None else None,
    )
    steps.done(
        "switch",
        f"current -> {release} (was {switched['previous'] or 'empty'}), pending: the device "
        f"reverts by itself at {switched['pending']['deadline_at']} unless the gate confirms; "
        f"{switched['service']}",
    )
    gate = confirm(t, root, release, python, server, switched, steps, llm=llm)
    steps.done("health", health_summary(gate))
    steps.done("commit", f"{release} committed at {gate.get('committed_at')}")
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


def rollback_device(t: Transport, root: str | None, to: str = "") -> dict[str, Any]:
    """`splitedge rollback`: previous (or --to) becomes current (a pending release just reverts);
    restart, check health."""
    back = t.op("rollback", root, to=to)
    facts_root = back.get("root") or root or t.op("facts", root, timeout_s=60)["root"]
    health = health_of_current(t, facts_root)
    return {
        "host": str(t.target),
        "current": back["current"],
        "rolled_back_from": back["rolled_back_from"],
        "service": back["service"],
        "health": health,
    }
