"""`splitedge bench server`: splitedge's server next to a naive SB3 server, measured in one run.

Both servers run as child processes; the same client processes (deploy/bench_load.py) drive
each cell in turn (clients x rpc x server, interleaved so drift in a shared machine's load
hits all of them alike). splitedge is measured on both inputs: split (the bundle's features per
request, e.g. 64 uint8 bytes, head.onnx) and raw (the 3x48x48 frame, full.onnx: the same work
as the naive server, so its ratio isolates batching and the async server from the smaller
message).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploy.bench_load import CellLoad, ClientPool
from deploy.server_process import (
    free_port,
    process_cpu_seconds,
    serve_argv,
    stop_process,
    wait_serving,
)
from protos import policy_pb2 as pb
from splitedge.errors import SplitedgeError

SERVERS = ("splitedge split", "splitedge raw", "naive SB3")


@dataclass
class BenchConfig:
    """What `bench server` measures; every field is on its command line."""

    bundle: Path
    sb3_model: Path
    clients: list[int] = field(default_factory=lambda: [1, 4, 16, 64, 256])
    rpcs: list[str] = field(default_factory=lambda: ["unary", "stream"])
    servers: list[str] = field(default_factory=lambda: list(SERVERS))
    seconds: float = 2.0
    warmup_s: float = 0.5
    client_processes: int = 4
    rounds: int = 1
    server_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.clients or min(self.clients) < 1:
            raise SplitedgeError(f"clients must be integers >= 1, got {self.clients}")
        bad = [r for r in self.rpcs if r not in ("unary", "stream")] or not self.rpcs
        if bad:
            raise SplitedgeError(f"modes must be unary and/or stream, got {self.rpcs}")
        bad_servers = [s for s in self.servers if s not in SERVERS] or not self.servers
        if bad_servers:
            raise SplitedgeError(f"servers must be from {', '.join(SERVERS)}; got {self.servers}")
        if "naive SB3" in self.servers and not self.sb3_model.is_file():
            raise SplitedgeError(
                f"the naive server needs the SB3 model {self.sb3_model}; pass --sb3-model "
                "or leave the naive server out with --servers"
            )
        if self.seconds <= 0 or self.warmup_s < 0 or self.client_processes < 1 or self.rounds < 1:
            raise SplitedgeError(
                f"need seconds > 0, warmup >= 0, client processes >= 1, rounds >= 1; got "
                f"{self.seconds}, {self.warmup_s}, {self.client_processes}, {self.rounds}"
            )


class ChildServer:
    """A server process on a free port; ready once its health check says SERVING."""

    def __init__(self, argv: list[str], address: str, metrics_port: int | None = None):
        self.address, self.metrics_port = address, metrics_port
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_serving(address, 120.0, self.proc)
        except BaseException:
            err = self.stop()
            raise SplitedgeError(
                f"{argv[2]} server did not start: {err.strip()[-400:] or '(no output)'}"
            ) from None

    def cpu_s(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> str:
        """SIGTERM, wait, and return what it wrote to stderr."""
        return stop_process(self.proc, self._err, 15.0)


def batch_totals(metrics_port: int) -> tuple[float, float]:
    """(samples, model calls) so far, summed over both models, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = {"_sum": 0.0, "_count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "splitedge_batch_size":
            for s in family.samples:
                for suffix in total:
                    if s.name.endswith(suffix):
                        total[suffix] += s.value
    return total["_sum"], total["_count"]


def _messages(bundle: Any) -> dict[str, tuple[bytes, bytes]]:
    """Per input kind, the (Hello, Tensor) bytes a correct client of the bundle sends."""
    policy = bundle.policy
    out, obs = policy["encoder"]["output"], policy["observation"]
    rng = np.random.default_rng(0)
    quantised = out["dtype"] == "uint8"  # else float32 features, sent as they are
    hello = pb.HelloRequest(
        bundle_name=bundle.name,
        bundle_version=bundle.version,
        encoder_digest=policy["encoder"]["digest"],
        feature_spec=pb.TensorSpec(
            shape=out["shape"],
            dtype=pb.UINT8 if quantised else pb.FLOAT32,
            scale=out["scale"],
            zero_point=out["zero_point"],
        ),
        client_id="bench",
    )
    frame = rng.integers(0, 256, obs["shape"], dtype=np.uint8)
    if quantised:
        features = rng.integers(0, 256, out["shape"], dtype=np.uint8)
        split = pb.Tensor(
            shape=out["shape"],
            dtype=pb.UINT8,
            data=features.tobytes(),
            scale=out["scale"],
            zero_point=out["zero_point"],
        )
    else:
        values = rng.uniform(0.0, 4.0, out["shape"]).astype("<f4")  # ReLU outputs are >= 0
        split = pb.Tensor(shape=out["shape"], dtype=pb.FLOAT32, data=values.tobytes())
    raw = pb.Tensor(shape=obs["shape"], dtype=pb.UINT8, data=frame.tobytes())
    raw_hello = pb.HelloRequest(mode=pb.MODE_RAW, bundle_name=bundle.name, client_id="bench")
    return {
        "split": (hello.SerializeToString(), split.SerializeToString()),
        "raw": (raw_hello.SerializeToString(), raw.SerializeToString()),
    }


def _features_text(bundle: Any) -> str:
    """What one split request carries, e.g. '64 uint8 features, 64 bytes'."""
    out = bundle.policy["encoder"]["output"]
    n = int(np.prod(out["shape"]))
    return f"{n} {out['dtype']} features, {n * np.dtype(str(out['dtype'])).itemsize} bytes"


def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure every (clients, rpc, server) cell; returns rows, ratios and the run's context."""
    from splitedge.bundle import load_bundle

    bundle = load_bundle(cfg.bundle)
    messages = _messages(bundle)
    servers: dict[str, ChildServer] = {}
    load0 = os.getloadavg()
    cells: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    try:
        if any(s.startswith("splitedge") for s in cfg.servers):
            port, mport = free_port(), free_port()
            argv = serve_argv(cfg.bundle, port, "--metrics-port", str(mport), *cfg.server_args)
            progress("starting splitedge serve")
            servers["splitedge"] = ChildServer(argv, f"127.0.0.1:{port}", mport)
        if "naive SB3" in cfg.servers:
            port = free_port()
            argv = [
                sys.executable,
                "-m",
                "deploy.naive_server",
                "--model",
                str(cfg.sb3_model),
                "--port",
                str(port),
                "--workers",
                str(max(cfg.clients) + 16),
            ]
            progress("starting the naive SB3 server")
            servers["naive"] = ChildServer(argv, f"127.0.0.1:{port}")
        with ClientPool(min(cfg.client_processes, max(cfg.clients))) as pool:
            for r in range(cfg.rounds):  # whole rounds, so slow drift in load hits every cell
                for clients in cfg.clients:
                    for rpc in cfg.rpcs:
                        for name in cfg.servers:
                            progress(f"round {r + 1}: {clients} clients, {rpc}, {name}")
                            row = _cell(pool, servers, name, clients, rpc, messages, cfg)
                            cells.setdefault((clients, rpc, name), []).append(row)
    finally:
        for s in servers.values():
            s.stop()
    rows = [_median(runs) for runs in cells.values()]
    return {
        "bundle": f"{bundle.name} {bundle.version}",
        "features": _features_text(bundle),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load0,
            "loadavg_after": os.getloadavg(),
        },
        "rows": rows,
        "ratios": ratios(rows),
    }


def _cell(
    pool: ClientPool,
    servers: dict[str, ChildServer],
    name: str,
    clients: int,
    rpc: str,
    messages: dict[str, tuple[bytes, bytes]],
    cfg: BenchConfig,
) -> dict[str, Any]:
    server = servers["naive" if name == "naive SB3" else "splitedge"]
    hello, tensor = messages["split" if name == "splitedge split" else "raw"]
    batches0 = batch_totals(server.metrics_port) if server.metrics_port else None
    cpu0 = server.cpu_s()
    r = pool.run(CellLoad(server.address, clients, rpc, hello, tensor), cfg.warmup_s, cfg.seconds)
    cpu = server.cpu_s() - cpu0  # includes the warm-up and the clients' setup: an upper bound
    lat = r["latencies"]
    mean_batch = 1.0
    if batches0 is not None and server.metrics_port:
        samples, calls = batch_totals(server.metrics_port)
        mean_batch = (samples - batches0[0]) / max(calls - batches0[1], 1.0)
    n = len(lat)
    return {
        "clients": clients,
        "rpc": rpc,
        "server": name,
        "decisions_per_s": n / cfg.seconds,
        "p50_ms": float(np.percentile(lat, 50) * 1e3) if n else float("nan"),
        "p99_ms": float(np.percentile(lat, 99) * 1e3) if n else float("nan"),
        "mean_batch": mean_batch,
        "server_cpu_ms_per_decision": 1e3 * cpu / n if n else float("nan"),
        "errors": r["errors"],
        "first_error": r["first_error"],
    }


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell over its rounds: the median of each number, the errors summed."""
    row = dict(runs[0])
    for key, v in runs[0].items():
        if isinstance(v, float):
            row[key] = float(np.median([r[key] for r in runs]))
    row["errors"] = sum(r["errors"] for r in runs)
    row["first_error"] = next((r["first_error"] for r in runs if r["first_error"]), "")
    return row


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """splitedge / naive decisions/s and both p99s, per (clients, rpc)."""
    by = {(r["clients"], r["rpc"], r["server"]): r for r in rows}
    out = []
    for clients, rpc, server in by:
        if server != "naive SB3":
            continue
        naive = by[(clients, rpc, server)]
        row: dict[str, Any] = {"clients": clients, "rpc": rpc}
        for kind in ("split", "raw"):
            mine = by.get((clients, rpc, f"splitedge {kind}"))
            if mine and naive["decisions_per_s"]:
                row[f"{kind} / naive decisions/s"] = (
                    mine["decisions_per_s"] / naive["decisions_per_s"]
                )
                row[f"{kind} p99 ms"] = mine["p99_ms"]
                # capacity: how many more decisions one server CPU-second buys
                row[f"naive / {kind} server CPU"] = (
                    naive["server_cpu_ms_per_decision"] / mine["server_cpu_ms_per_decision"]
                )
        row["naive p99 ms"] = naive["p99_ms"]
        out.append(row)
    return out


def verdicts(result: dict[str, Any], at_clients: int = 64) -> list[str]:
    """One line per RPC style: does splitedge split serve >= 5x naive with a lower p99?"""
    lines = []
    for r in result["ratios"]:
        if r["clients"] != at_clients or "split / naive decisions/s" not in r:
            continue
        x, p99, naive = r["split / naive decisions/s"], r["split p99 ms"], r["naive p99 ms"]
        ok = x >= 5 and p99 < naive
        lines.append(
            f"{at_clients} clients, {r['rpc']}: splitedge split {x:.1f}x the naive decisions/s, "
            f"p99 {p99:.1f} ms vs {naive:.1f} ms: {'meets' if ok else 'does NOT meet'} "
            "the 5x-and-lower-p99 bar"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    """docs/results/server.md: the command, the machine, every cell, the ratios, the verdicts."""
    from splitedge.commands.bench_server import COLUMNS
    from splitedge.output import table

    m, c = result["machine"], result["config"]
    return "\n".join(
        [
            "# Policy server: splitedge vs a naive SB3 server",
            "",
            f"Generated by `{result.get('command', 'splitedge bench server')}` on "
            f"{time.strftime('%Y-%m-%d %H:%M')}; rerun it to refresh this file.",
            "",
            f"Machine: {m['cpus']} CPUs shared by the servers, the client processes and "
            f"anything else running (load average {m['loadavg_before'][0]:.1f} before, "
            f"{m['loadavg_after'][0]:.1f} after). Bundle {result['bundle']}; "
            f"{c['seconds']} s per cell after {c['warmup_s']} s warm-up, "
            f"{c['client_processes']} client processes; cells interleaved in one run, "
            f"{c['rounds']} round(s), each number the median over rounds.",
            "",
            "Each client is a closed loop on its own gRPC channel: send, wait for the action, "
            f"send again. `splitedge split` receives {result.get('features', '64 uint8 features, 64 bytes')} "
            "(head.onnx); "
            "`splitedge raw` receives the 3x48x48 frame (full.onnx), the same work as "
            "`naive SB3`, a hand-written gRPC servicer calling the SB3 policy's `predict` "
            "once per request. Server CPU is the server process's CPU seconds over the cell "
            "(warm-up included) per decision measured: its cost, whoever is the bottleneck.",
            "",
            "```",
            table(result["rows"], [k for k in COLUMNS]),
            "```",
            "",
            "## splitedge / naive",
            "",
            "```",
            table(result["ratios"]) if result["ratios"] else "(naive server not measured)",
            "```",
            "",
            *[f"- {line}" for line in verdicts(result)],
            "",
            "`naive / split server CPU` is the capacity ratio: how many more decisions one "
            "CPU-second of the server buys, whether or not the server was the bottleneck. "
            "Batching amortises the model call; it cannot amortise gRPC's per-call cost, "
            "which in gRPC Python is several times a stream message's. So unary calls gain "
            "less than streams, and here the closed-loop clients share the server's two "
            "CPUs, which caps the decisions/s any server can show. Edge clients stream by "
            "default (`ClientConfig.rpc = 'stream'`).",
            "",
        ]
    )
