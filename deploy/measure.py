"""Decision latency of a split policy vs raw offload over shaped links, closed loop, at scale.

One policy server process serves every cell of a sweep (links x modes x concurrent
clients). Each link is shaped by a backend (kernel netem, kernel tbf + userspace delay,
or the userspace proxy alone; chosen automatically and always reported). Each cell
starts N edge client processes, lets them connect and warm up, releases them together,
and records per-step latency; the link's counters give the bytes that crossed it and the
server process's CPU time gives the server's cost per decision. The analytic bound is
what an ideal link and zero software overhead would give one client: 2 x one-way delay +
serialisation of the metered bytes both ways + measured encode + measured server compute.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy import realtime_report, remote
from deploy.cell_store import CellStore
from deploy.clients import ClientGroup
from deploy.link import netns
from deploy.link.kernel import (
    BackendChoice,
    choose_backend,
    jitter_method,
    loss_method,
    open_link,
    unsupported,
)
from deploy.link.profiles import LinkProfile, bound_ms
from deploy.measure_checks import (
    check_links,
    checked_env,
    control_rate,
)
from deploy.measure_json import loop_of
from deploy.server_process import ServerProcess
from edge.client import MODES
from edge.telemetry import StepRecord, summarise
from splitedge.bundle import load_bundle
from splitedge.errors import SplitedgeError

MAX_CLIENTS = 256
LOOPS = ("sync", "realtime", "both")


def steps_per_client(steps: int, clients: int) -> int:
    """Timed steps for each of `clients` clients: fewer each as there are more, at least 10."""
    return steps if clients == 1 else max(min(steps, 10), steps // clients)


@dataclass
class MeasureConfig:
    """One sweep: links x modes x concurrent clients; `steps` decisions per single-client cell."""

    bundle: Path
    links: list[str]
    modes: list[str] = field(default_factory=lambda: ["split", "raw"])
    steps: int = 100
    warmup: int = 5
    backend: str = "auto"  # encoder backend on the edge
    rpc: str = "stream"
    deadline_s: float = 10.0
    seed: int = 0
    clients: list[int] = field(default_factory=lambda: [1])
    scale_links: list[str] | None = None  # links that get the clients > 1 cells (None: all)
    link_backend: str = "auto"  # auto, netem, tbf, proxy
    env: str | None = None  # id or entry point; None: the bundle's recorded env or task
    env_kwargs: dict[str, Any] | None = None  # None: the bundle's recorded kwargs
    links_file: Path | None = None  # the user's links TOML; None: deploy/links.toml
    server: str | None = None  # HOST:PORT of a running server: measured as it is, no emulation
    server_up_kbit: float | None = None  # the user's link rates to it, for the bound
    server_down_kbit: float | None = None
    loop: str = "sync"  # sync: the env waits for each action; realtime: it never does; both
    control_hz: float | None = None  # real-time tick rate; None: the env's declared rate

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise SplitedgeError(f"--loop {self.loop!r} is not one of {', '.join(LOOPS)}")
        if self.control_hz is not None and not self.control_hz > 0:
            raise SplitedgeError(f"--control-hz must be > 0, got {self.control_hz}")
        if self.loop != "sync" and self.rpc != "stream":
            raise SplitedgeError(
                f"--loop {self.loop} sends without waiting, which needs --rpc stream "
                f"(got {self.rpc}); drop --rpc unary"
            )
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise SplitedgeError(
                f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}"
            )
        if self.steps < 1 or self.warmup < 0:
            raise SplitedgeError(
                f"--steps must be >= 1 and warm-up >= 0 (got {self.steps}, {self.warmup})"
            )
        if not self.links:
            raise SplitedgeError("no links given; name some with --links (see deploy/links.toml)")
        if not self.clients or any(not 1 <= n <= MAX_CLIENTS for n in self.clients):
            raise SplitedgeError(
                f"--clients must be counts between 1 and {MAX_CLIENTS}, got {self.clients}"
            )
        unknown = set(self.scale_links or []) - set(self.links)
        if unknown:
            raise SplitedgeError(
                f"--scale-links {', '.join(sorted(unknown))} not among --links {', '.join(self.links)}"
            )

    def loops(self) -> list[str]:
        """The loops each (link, mode, clients) cell runs, in order."""
        return ["sync", "realtime"] if self.loop == "both" else [self.loop]

    def clients_for(self, link: str) -> list[int]:
        """Concurrency levels measured on this link."""
        if self.scale_links is None or link in self.scale_links:
            return self.clients
        return [n for n in self.clients if n == 1] or [min(self.clients)]


@dataclass
class Cell:
    """The result of one (link, mode, clients) cell."""

    link: str
    mode: str
    clients: int
    summary: dict[str, Any]
    link_up: float  # bytes per decision the link's shaper metered (frames for kernel backends)
    link_down: float
    payload_up: float  # bytes per decision through the link, HTTP/2 framing included
    payload_down: float
    bound_ms: float
    records: list[StepRecord]
    encoder: str
    bound_up: float = 0.0  # the data-carrying part of link_up: what the bound charges
    bound_down: float = 0.0
    decisions_s: float = 0.0
    server_cpu_ms: float = 0.0  # server process CPU per decision, its idle rate taken out
    loss_up_pct: float = 0.0  # packets the loss stage dropped in this cell, per direction
    loss_down_pct: float = 0.0
    rate_changes: int = 0  # rate-trace steps applied to the shaper during this cell
    retrans: int = 0  # TCP segments retransmitted across the link in this cell (kernel paths)
    loop: str = "sync"
    episode_return: float = float("nan")  # mean finished return; the running one's if none
    episodes: int = 0  # episodes finished
    realtime: dict[str, Any] = field(default_factory=dict)  # realtime_report.summarise()

    def latencies(self) -> list[float]:
        """Per-step decision latency of the steps that did not fall back."""
        return [r.total_ms for r in self.records if not r.fallback]

    def row(self) -> dict[str, Any]:
        s = self.summary
        if self.loop == "realtime":
            return {
                "link": self.link, "mode": self.mode, "clients": self.clients, "loop": self.loop,
                "p50_ms": s["p50_ms"], "p95_ms": s["p95_ms"], "p99_ms": s["p99_ms"],
                "bound_ms": self.bound_ms, **self.realtime, "unanswered": s["fallbacks"],
                "requests": s["steps"], "up_B": self.link_up, "down_B": self.link_down,
                "msg_up_B": s["bytes_up"], "encode_ms": s["encode_ms"],
            }  # fmt: skip
        return {
            "link": self.link,
            "mode": self.mode,
            "clients": self.clients,
            "p50_ms": s["p50_ms"],
            "p95_ms": s["p95_ms"],
            "p99_ms": s["p99_ms"],
            "bound_ms": self.bound_ms,
            "p50_minus_bound_ms": s["p50_ms"] - self.bound_ms,
            "decisions_s": self.decisions_s,
            "up_B": self.link_up,
            "down_B": self.link_down,
            "bound_up_B": self.bound_up,
            "bound_down_B": self.bound_down,
            "payload_up_B": self.payload_up,
            "payload_down_B": self.payload_down,
            "msg_up_B": s["bytes_up"],
            "msg_down_B": s["bytes_down"],
            "encode_ms": s["encode_ms"],
            "server_ms": s["server_compute_ms"],
            "server_cpu_ms": self.server_cpu_ms,
            "fallbacks": s["fallbacks"],
            "steps": s["steps"],
            "loss_up_pct": self.loss_up_pct,
            "loss_down_pct": self.loss_down_pct,
            "rate_changes": self.rate_changes,
            "retrans": self.retrans,
            "loop": self.loop,
            "episode_return": self.episode_return,
            "episodes": self.episodes,
        }


@dataclass
class Sweep:
    """Every cell of a sweep and the link backend that shaped it."""

    cells: list[Any]  # Cell, or StoredCell for a cell resumed from an earlier run
    backend: BackendChoice
    notes: list[str] = field(default_factory=list)
    env: str = ""  # the env the edge clients ran
    control_hz: float | None = None  # the real-time loop's rate (None: sync only)
    profiles: dict[str, Any] = field(default_factory=dict)  # name -> the profile measured


def idle_cpu_rate(server: ServerProcess, windows: int = 4, seconds: float = 0.75) -> float:
    """CPU seconds per second the server burns with no clients (gRPC pollers, timers).

    The smallest of a few windows: the first second after start-up still carries loading
    work (2.9 ms/s measured vs ~0.5 settled), which would be subtracted from every cell."""
    rates = []
    for _ in range(windows):
        t0, c0 = time.perf_counter(), server.cpu_seconds()
        time.sleep(seconds)
        rates.append((server.cpu_seconds() - c0) / (time.perf_counter() - t0))
    return min(rates)


def measure_cell(
    server: ServerProcess,
    link: Any,
    profile: LinkProfile,
    mode: str,
    clients: int,
    cfg: MeasureConfig,
    on_step: Callable[[int], None] | None = None,
    idle_cpu: float = 0.0,
    loop: str = "sync",
    control_hz: float | None = None,
) -> Cell:
    """Run one cell: `clients` edge processes through `link`, released together; in real
    time (loop="realtime") each ticks at control_hz and `steps` counts ticks."""
    steps = steps_per_client(cfg.steps, clients)
    job = {
        "bundle": str(cfg.bundle), "server": link.address, "mode": mode,
        "backend": cfg.backend, "rpc": cfg.rpc, "deadline_s": cfg.deadline_s,
        "warmup": cfg.warmup, "steps": steps, "seed": cfg.seed, "netns": link.netns,
        "env": cfg.env, "env_kwargs": cfg.env_kwargs, "loop": loop, "control_hz": control_hz,
    }  # fmt: skip
    with ClientGroup(clients, job) as group:
        before, cpu0 = link.stats(), server.cpu_seconds()
        group.go()
        results = group.wait(steps * (cfg.deadline_s + 2) + 120, on_step)
        after, cpu1 = link.stats(), server.cpu_seconds()
        seconds = group.t_done - group.t_go
    records = [r for res in results for r in res.records]
    failed = [r.error for r in records if r.fallback]
    if len(failed) == len(records):
        causes = "; ".join(f"{n}x {e}" for e, n in Counter(failed).most_common(2))
        raise SplitedgeError(
            f"{profile.name}/{mode}: every decision fell back ({causes}); "
            "is the server healthy and --deadline-ms long enough for this link?"
        )
    n = len(records)
    lost = {
        d: 100.0 * (after[f"lost_{d}"] - before[f"lost_{d}"]) / sent
        for d in ("up", "down")
        if (sent := after.get(f"pkts_{d}", 0) - before.get(f"pkts_{d}", 0)) > 0
    }
    changes = after.get("rate_changes", 0) - before.get("rate_changes", 0)
    retrans = after.get("retrans", 0) - before.get("retrans", 0)
    per = {
        k: (after[k] - before[k]) / n
        for k in ("link_up", "link_down", "bound_up", "bound_down", "bytes_up", "bytes_down")
    }
    summary = summarise(records)
    bound = (
        bound_ms(profile, per["bound_up"], per["bound_down"])
        + summary["encode_ms"]
        + summary["server_compute_ms"]
    )
    extras = [r.extra for r in results]
    rt: dict[str, Any] = {}
    if loop == "realtime":
        rt = {
            "control_hz": control_hz,
            **realtime_report.summarise([e["realtime"] for e in extras]),
        }
        returns = (rt["episode_return"], rt["episodes"])
    else:
        finished = [x for e in extras for x in e.get("episode_returns", [])]
        returns = realtime_report.episode_return(
            finished, [e.get("partial_return", 0.0) for e in extras]
        )
    return Cell(
        profile.name, mode, clients, summary, per["link_up"], per["link_down"],
        per["bytes_up"], per["bytes_down"], bound, records, results[0].encoder,
        bound_up=per["bound_up"], bound_down=per["bound_down"], decisions_s=n / seconds,
        server_cpu_ms=1e3 * (cpu1 - cpu0 - idle_cpu * seconds) / n,
        loss_up_pct=lost.get("up", 0.0), loss_down_pct=lost.get("down", 0.0),
        rate_changes=changes, retrans=retrans, loop=loop, episode_return=returns[0],
        episodes=returns[1], realtime=rt,
    )  # fmt: skip


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while inside, so the same cleanup runs for both."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def shaped_server(
    bundle: Path, choice: BackendChoice, notes: list[str]
) -> Iterator[tuple[ServerProcess, netns.NamespacePair | None]]:
    """The policy server, inside the server namespace for the kernel backends; cleaned up always."""
    args = ["--grace-s", "0.5"]  # a sweep's end need not wait for streams to drain
    with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        pair = None
        if choice.name != "proxy":
            swept = netns.sweep_stale()
            if swept:
                notes.append(f"removed stale namespaces/links of dead runs: {', '.join(swept)}")
            pair = netns.NamespacePair()
            stack.callback(pair.destroy)  # registered first, so it runs last
            pair.create()
            notes.extend(pair.notes)
            server = ServerProcess(bundle, extra_args=args, netns=pair.server, host=netns.SERVER_IP)
        else:
            server = ServerProcess(bundle, extra_args=args)
        yield stack.enter_context(server), pair


def measure(cfg: MeasureConfig, progress: bool = True, store: CellStore | None = None) -> Sweep:
    """Run every (link, mode, clients) cell against one policy server process.

    With a store, --out is checked writable before anything starts, each finished cell is
    written as it completes, and cells a previous run of the same sweep finished are reused."""
    env, declared = checked_env(cfg.bundle, cfg.env, cfg.env_kwargs)
    hz, hz_from = control_rate(cfg, env, declared)
    if cfg.server:
        remote.split_address(cfg.server)
        remote.check_server(cfg.bundle, cfg.server, "split")
        rtt = remote.measured_rtt_ms(cfg.server)
        profiles = [
            remote.remote_profile(cfg.server, rtt, cfg.server_up_kbit, cfg.server_down_kbit)
        ]
        choice = BackendChoice("remote", [f"no emulation: measured against {cfg.server} as it is"])
    else:
        profiles = check_links(cfg)
        choice = choose_backend(cfg.link_backend)
    lacking = [why for p in profiles if (why := unsupported(p, choice.name))]
    if lacking:
        raise SplitedgeError("; ".join(lacking))
    sweep = Sweep(
        [], choice, env=env, profiles={p.name: asdict(p) for p in profiles}, control_hz=hz
    )
    if hz is not None:
        sweep.notes.append(f"real-time loop at {hz:g} Hz ({hz_from})")
    if any(p.loss_pct for p in profiles):
        sweep.notes.append(f"packet loss by {loss_method(choice.name)}")
    for p in profiles:
        for d, path in (("up", p.up_trace), ("down", p.down_trace)):
            if path:
                sweep.notes.append(
                    f"{p.name}: {d}link rate from trace {_shown(path)} (mean {getattr(p, d + '_kbit'):g} "
                    f"kbit/s, the bound's rate), applied by tc qdisc change, looped"
                )
    if any(p.jitter_ms for p in profiles):
        sweep.notes.append(f"jitter by {jitter_method(choice.name)}")
    if rto := sorted({p.name for p in profiles if p.tcp_rto_min_ms}):
        sweep.notes.append(
            f"TCP rto_min lowered on both ends' routes (`ip route ... rto_min`) for {', '.join(rto)}"
        )
    if store is not None:
        store.open()
        store.sweep = sweep
    manifest = load_bundle(cfg.bundle).manifest
    plan = []  # (profile, mode, clients, loop, key, fingerprint) of the cells still to measure
    for p in profiles:
        for mode in cfg.modes:
            for n in cfg.clients_for(p.name):
                for loop in cfg.loops():
                    key = f"{p.name}/{mode}/x{n}" + ("/realtime" if loop == "realtime" else "")
                    fp = cell_fingerprint(cfg, manifest, choice.name, p)
                    if loop == "realtime":
                        fp = {**fp, "loop": loop, "control_hz": hz}
                    old = store.lookup(key, fp) if store is not None else None
                    if old is not None:
                        sweep.cells.append(old)
                    else:
                        plan.append((p, mode, n, loop, key, fp))
    if store is not None and store.resumed:
        sweep.notes.append(
            f"resumed {store.resumed} cell(s) finished earlier from {store.path}; "
            f"measured {len(plan)}"
        )
    if not plan:
        return sweep
    total = sum(n * steps_per_client(cfg.steps, n) for _, _, n, *_ in plan)
    bar = _progress(total, progress)
    try:
        root = load_bundle(cfg.bundle).root
        target = (
            remote.remote(cfg.server) if cfg.server else shaped_server(root, choice, sweep.notes)
        )
        with target as (server, pair):
            host, port = server.address.rsplit(":", 1)
            idle = 0.0 if cfg.server else idle_cpu_rate(server)
            if not cfg.server:
                sweep.notes.append(
                    f"server idle CPU {1e3 * idle:.1f} ms/s, subtracted from server_cpu_ms"
                )
            for profile in dict.fromkeys(p for p, *_ in plan):
                with open_link(choice.name, profile, (host, int(port)), pair, cfg.seed) as link:
                    for _, mode, n, loop, key, fp in (c for c in plan if c[0] == profile):
                        bar.set_description(key)
                        cell = measure_cell(
                            server, link, profile, mode, n, cfg, lambda _: bar.update(1), idle,
                            loop, hz,
                        )  # fmt: skip
                        sweep.cells.append(cell)
                        if store is not None:
                            store.add(key, fp, cell)
    finally:
        bar.close()
    order = {(c.link, c.mode, c.clients, c.loop): i for i, c in enumerate(_planned(cfg, profiles))}
    sweep.cells.sort(key=lambda c: order[(c.link, c.mode, c.clients, loop_of(c))])
    return sweep


def _planned(cfg: MeasureConfig, profiles: list[LinkProfile]) -> list[Any]:
    """Every cell of the sweep as (link, mode, clients) holders, in sweep order."""
    from types import SimpleNamespace

    return [
        SimpleNamespace(link=p.name, mode=m, clients=n, loop=loop)
        for p in profiles
        for m in cfg.modes
        for n in cfg.clients_for(p.name)
        for loop in cfg.loops()
    ]


def cell_fingerprint(
    cfg: MeasureConfig, bundle: dict[str, Any], link_backend: str, profile: LinkProfile
) -> dict[str, Any]:
    """What a cell's numbers depend on: a stored cell is reused only if all of it matches."""
    return {
        "bundle": [bundle.get("name"), bundle.get("version"), bundle.get("files")],
        "steps": cfg.steps, "warmup": cfg.warmup, "backend": cfg.backend, "rpc": cfg.rpc,
        "deadline_s": cfg.deadline_s, "seed": cfg.seed, "env": cfg.env,
        "env_kwargs": cfg.env_kwargs, "link_backend": link_backend, "profile": asdict(profile),
    }  # fmt: skip


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="step", disable=not enabled, leave=False, dynamic_ncols=True)


def _shown(path: str) -> str:
    """A path as the user would type it: relative to the working directory when under it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
