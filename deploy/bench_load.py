"""Load for `bench server`: closed-loop gRPC clients in separate processes.

Each worker process runs many clients on one asyncio loop; every client has its own channel
(its own TCP connection, as a device has), says Hello, then sends the same pre-serialised
ActRequest again and again, waiting for each reply (unary Act or one ActStream). Messages
stay bytes on the client side, so the clients' CPU goes to gRPC, not to protobuf, and both
servers are driven by exactly the same bytes. Round trips that end inside the measuring
window count; their latencies give p50/p99.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from protos import policy_pb2 as pb

HELLO, ACT, STREAM = (f"/splitedge.v1.Policy/{m}" for m in ("Hello", "Act", "ActStream"))
CALL_TIMEOUT_S = 30.0


@dataclass
class CellLoad:
    """What one worker runs in one cell: its clients' target, RPC style and messages."""

    target: str
    clients: int
    rpc: str  # "unary" or "stream"
    hello: bytes  # a serialised HelloRequest
    tensor: bytes  # a serialised Tensor (features or a frame)


async def _connect(load: CellLoad, options: list[tuple[str, Any]]) -> list[tuple[Any, bytes]]:
    import grpc

    async def one(i: int) -> tuple[Any, bytes]:
        channel = grpc.aio.insecure_channel(load.target, options=options)
        reply = pb.HelloReply.FromString(
            await channel.unary_unary(HELLO)(
                load.hello, timeout=CALL_TIMEOUT_S, wait_for_ready=True
            )
        )
        request = pb.ActRequest(
            session_id=reply.session_id, step=i, input=pb.Tensor.FromString(load.tensor)
        )
        return channel, request.SerializeToString()

    return list(await asyncio.gather(*(one(i) for i in range(load.clients))))


async def _client(
    channel: Any, request: bytes, rpc: str, start: float, end: float, out: list[float]
) -> str:
    """Act until `end`; append the latency of every round trip that finished in [start, end]."""
    import grpc

    try:
        if rpc == "unary":
            act = channel.unary_unary(ACT)
            while True:
                t0 = time.monotonic()
                await act(request, timeout=CALL_TIMEOUT_S)
                t1 = time.monotonic()
                if t1 >= start:
                    if t1 > end:
                        return ""
                    out.append(t1 - t0)
        call = channel.stream_stream(STREAM)(timeout=CALL_TIMEOUT_S + end - time.monotonic())
        try:
            while True:
                t0 = time.monotonic()
                await call.write(request)
                reply = await call.read()
                t1 = time.monotonic()
                if reply is grpc.aio.EOF:
                    return "stream ended by the server"
                if t1 >= start:
                    if t1 > end:
                        return ""
                    out.append(t1 - t0)
        finally:
            call.cancel()
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]


async def _run_cell(conn: Connection, load: CellLoad) -> dict[str, Any]:
    options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 8 << 20)]
    try:
        clients = await _connect(load, options)
    except Exception as e:
        conn.send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return {}
    conn.send({"ready": True})
    start, end = conn.recv()  # the parent picks one window for every worker
    latencies: list[float] = []
    errors = await asyncio.gather(
        *(_client(ch, req, load.rpc, start, end, latencies) for ch, req in clients)
    )
    for ch, _ in clients:
        await ch.close()
    failed = [e for e in errors if e]
    return {
        "latencies": np.asarray(latencies, np.float64).tobytes(),
        "errors": len(failed),
        "first_error": failed[0] if failed else "",
    }


def worker_main(conn: Connection) -> None:
    """A client process: run cells the parent sends until it sends None."""
    while True:
        load = conn.recv()
        if load is None:
            return
        result = asyncio.run(_run_cell(conn, load))
        if result:
            conn.send(result)


class ClientPool:
    """Worker processes (spawned: no state inherited from the parent) that generate the load."""

    def __init__(self, processes: int):
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(child,), name=f"bench-clients-{i}", daemon=True
            )
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)

    def run(self, load: CellLoad, warmup_s: float, seconds: float) -> dict[str, Any]:
        """Spread load.clients over the workers, measure for `seconds` after `warmup_s`."""
        n = len(self._conns)
        shares = [load.clients // n + (i < load.clients % n) for i in range(n)]
        busy = [(c, s) for c, s in zip(self._conns, shares, strict=True) if s]
        for conn, share in busy:
            conn.send(CellLoad(load.target, share, load.rpc, load.hello, load.tensor))
        setup_errors = [msg["error"] for msg in (c.recv() for c, _ in busy) if not msg["ready"]]
        if setup_errors:
            raise ConnectionError(
                f"clients could not say Hello to {load.target}: {setup_errors[0]}"
            )
        start = time.monotonic() + warmup_s
        for conn, _ in busy:
            conn.send((start, start + seconds))
        parts = [conn.recv() for conn, _ in busy]
        latencies = np.concatenate([np.frombuffer(p["latencies"], np.float64) for p in parts])
        errors = sum(p["errors"] for p in parts)
        first = next((p["first_error"] for p in parts if p["first_error"]), "")
        return {"latencies": latencies, "errors": errors, "first_error": first}

    def close(self) -> None:
        """Stop the workers."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
