"""The naive baseline of `splitedge bench server`: a gRPC servicer written by hand around SB3.

Each request's frame goes to the Stable-Baselines3 policy's `predict` on its own, as a user
would write it without a batcher. It speaks splitedge.v1.Policy in raw mode (frames in,
actions out), so the same benchmark clients drive it. It is given a fair chance: torch uses
one intra-op thread per call (its default of all cores oversubscribes a busy machine and was
tens of times slower per predict here) and the thread pool has a thread for every client, so
no stream waits for a worker.

    python -m deploy.naive_server --model models/zoo/cartpole-ppo.sb3.zip --port 50061
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc


class NaivePolicy(pb_grpc.PolicyServicer):
    """One `model.predict` per request; no batching, no validation beyond numpy's own."""

    def __init__(self, model: Any):
        self.model = model
        self.shape = tuple(model.observation_space.shape)

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:  # noqa: N802
        return pb.HelloReply(session_id=1)

    def Act(self, request: pb.ActRequest, context: grpc.ServicerContext) -> pb.ActReply:  # noqa: N802
        obs = np.frombuffer(request.input.data, np.uint8).reshape(self.shape)
        action, _ = self.model.predict(obs, deterministic=True)
        a = np.atleast_1d(np.asarray(action))
        # as the splitedge server replies: a discrete action is [1] INT64, a continuous one FLOAT32
        if a.dtype.kind in "iu":
            a, dtype = a.astype("<i8"), pb.INT64
        else:
            a, dtype = a.astype("<f4"), pb.FLOAT32
        return pb.ActReply(
            step=request.step,
            action=pb.Tensor(shape=list(a.shape), dtype=dtype, data=a.tobytes()),
        )

    def ActStream(  # noqa: N802
        self, request_iterator: Iterator[pb.ActRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ActReply]:
        for request in request_iterator:
            yield self.Act(request, context)


def _recorded_algo(model: Path) -> str:
    result = model.parent / "result.json"
    if result.is_file():
        return str(json.loads(result.read_text()).get("config", {}).get("algo", "ppo"))
    return "ppo"


def main(argv: list[str] | None = None) -> int:
    """Serve the SB3 model until SIGTERM; prints one 'serving' line when ready."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="SB3 .zip saved by `splitedge train`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=300, help="gRPC threads (one per client)")
    p.add_argument(
        "--algo",
        default=None,
        choices=("ppo", "sac", "ddpg"),
        help="SB3 algorithm (default: config.algo of result.json beside the model, else ppo)",
    )
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args(argv)

    import stable_baselines3
    import torch

    torch.set_num_threads(args.torch_threads)
    algo = args.algo or _recorded_algo(Path(args.model))
    model = getattr(stable_baselines3, algo.upper()).load(args.model, device="cpu")
    model.predict(np.zeros(model.observation_space.shape, np.uint8), deterministic=True)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    pb_grpc.add_PolicyServicer_to_server(NaivePolicy(model), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"serving naive SB3 {args.model} on {args.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(1.0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
