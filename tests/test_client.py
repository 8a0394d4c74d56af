"""The device client under a late reply and a broken link (issue 19): a reply that misses its
decision's deadline costs that decision only (no burst of fallbacks, the stream is not
reopened); a broken link is mended in the background while each act() keeps its deadline;
connect(wait_s=...) waits that long for the server and no longer; docs/client.md is what
the docstrings say."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from deploy.server_process import free_port
from edge.client import ClientConfig, PolicyClient, connect
from edge.client_docs import options_reference
from edge.wire import to_tensor
from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from splitedge.bundle import load_bundle
from tests.conftest import ROOT

DEADLINE_S = 1.0  # a local reply takes milliseconds: far inside it even on a loaded machine
LATE_S = 3 * DEADLINE_S  # a late reply: well past it
EVERY = 5  # one reply in five is late


class LatePolicy(pb_grpc.PolicyServicer):
    """Answers every step with action = step % 2; every EVERY-th step's reply comes LATE_S
    late. Replies are sent as they are ready, so a late one never holds up the next."""

    def __init__(self) -> None:
        self.hellos = self.streams = 0

    def Hello(self, request, context):  # noqa: N802 (gRPC method names)
        self.hellos += 1
        return pb.HelloReply(session_id=7, bundle_name=request.bundle_name)

    @staticmethod
    def late(step: int) -> bool:
        return step % EVERY == 0

    def _reply(self, step: int) -> pb.ActReply:
        return pb.ActReply(step=step, action=to_tensor(np.array([step % 2], np.int64)))

    def Act(self, request, context):  # noqa: N802
        if self.late(request.step):
            time.sleep(LATE_S)
        return self._reply(request.step)

    def ActStream(self, request_iterator, context):  # noqa: N802
        self.streams += 1
        out: queue.Queue[pb.ActReply | None] = queue.Queue()

        def read() -> None:
            try:
                for r in request_iterator:
                    delay = LATE_S if self.late(r.step) else 0.0
                    threading.Timer(delay, out.put, args=(self._reply(r.step),)).start()
            except grpc.RpcError:  # the client went away
                pass
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (reply := out.get()) is not None:
            yield reply


def _serve(port: int = 0) -> tuple[grpc.Server, LatePolicy, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    servicer = LatePolicy()
    pb_grpc.add_PolicyServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, servicer, port


@pytest.fixture
def late_server() -> Iterator[tuple[LatePolicy, int]]:
    server, servicer, port = _serve()
    yield servicer, port
    server.stop(0)


FRAME = np.zeros((3, 48, 48), np.uint8)


@pytest.mark.parametrize("rpc", ["stream", "unary"])
def test_late_replies_cost_their_own_decisions_only(
    tiny_bundle: Path, late_server: tuple[LatePolicy, int], rpc: str
) -> None:
    servicer, port = late_server
    cfg = ClientConfig(server=f"127.0.0.1:{port}", deadline_s=DEADLINE_S, rpc=rpc,
                       backend="ort")  # fmt: skip
    fell_back, wrong = [], []
    with PolicyClient(load_bundle(tiny_bundle), cfg).connect() as client:
        for _ in range(4 * EVERY):
            action = client.act(FRAME)
            step = client._step
            if client.last.fallback:  # type: ignore[union-attr]
                fell_back.append(step)
            elif action != step % 2:
                wrong.append(step)
        late = [s for s in range(1, 4 * EVERY + 1) if LatePolicy.late(s)]
        end = time.monotonic() + 10 * LATE_S
        while rpc == "stream" and client.late_replies < len(late) and time.monotonic() < end:
            time.sleep(0.05)  # the late replies still arrive, and are dropped
        print(
            f"\n{rpc}: fell back at steps {fell_back}; late replies dropped {client.late_replies}"
        )
        assert fell_back == late and client.fallbacks == len(late)  # exactly those, no bursts
        assert wrong == []
        assert client.reconnects == 0  # a late reply is not a broken link
        if rpc == "stream":
            assert servicer.streams == 1 and client.late_replies == len(late)  # never reopened
        assert servicer.hellos == 1


def test_a_broken_link_is_mended_in_the_background(tiny_bundle: Path) -> None:
    server, _, port = _serve()
    deadline = 0.2
    cfg = ClientConfig(server=f"127.0.0.1:{port}", deadline_s=deadline, backend="ort",
                       backoff_s=(0.02, 0.2))  # fmt: skip
    with PolicyClient(load_bundle(tiny_bundle), cfg).connect() as client:
        client.act(FRAME)
        assert not client.last.fallback  # type: ignore[union-attr]
        server.stop(0).wait()  # the link breaks
        slowest = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            client.act(FRAME)
            slowest = max(slowest, time.perf_counter() - t0)
            assert client.last.fallback  # type: ignore[union-attr]
        server, _, _ = _serve(port)  # back on the same port
        end = time.monotonic() + 30
        while True:
            t0 = time.perf_counter()
            client.act(FRAME)
            slowest = max(slowest, time.perf_counter() - t0)
            if not client.last.fallback:  # type: ignore[union-attr]
                break
            assert time.monotonic() < end, client.last.error  # type: ignore[union-attr]
            time.sleep(0.02)
        print(
            f"\nslowest act() while the link was down: {slowest * 1e3:.0f} ms (deadline {deadline * 1e3:.0f} ms)"
        )
        assert client.reconnects == 1
        assert slowest < 10 * deadline  # reconnecting never ate a decision's deadline
    server.stop(0)


def test_connect_waits_wait_s_for_the_server_and_no_longer(tiny_bundle: Path) -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):  # nothing there
        connect(tiny_bundle, f"127.0.0.1:{port}", deadline_s=0.1, wait_s=0.5, backend="ort")
    gave_up = time.monotonic() - t0
    started: list[grpc.Server] = []
    timer = threading.Timer(1.0, lambda: started.append(_serve(port)[0]))
    timer.start()
    t0 = time.monotonic()
    try:  # a server that comes up within wait_s is used
        with connect(tiny_bundle, f"127.0.0.1:{port}", deadline_s=0.1, wait_s=30,
                     backend="ort", backoff_s=(0.05, 0.2)) as client:  # fmt: skip
            waited = time.monotonic() - t0
            assert client.act(FRAME) in (0, 1) and not client.last.fallback  # type: ignore[union-attr]
    finally:
        timer.join()
        for s in started:
            s.stop(0)
    print(
        f"\nconnect(wait_s=0.5) gave up after {gave_up:.2f} s; connect(wait_s=30) got a server started 1 s later after {waited:.2f} s"
    )
    assert 0.5 * 0.5 <= gave_up < 10 * 0.5  # honoured (was ~5.5 s whatever the deadline)
    assert 0.9 <= waited < 30


def test_docs_client_md_is_generated_from_the_docstrings() -> None:
    text = (ROOT / "docs" / "client.md").read_text()
    assert text == options_reference(), "regenerate: python -m edge.client_docs > docs/client.md"
    for option in ("deadline_s", "wait_s", "rpc", "fallback", "backoff_s", "security"):
        assert f"{option}:" in text
