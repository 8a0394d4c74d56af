"""The real-time parts of a request and a reply (issue 17): actions in flight in, chunks out.

A delay-aware bundle (policy.realtime.action_history D > 0) reads, next to each request's
features, the last D actions chosen before that observation: `ActRequest.actions_in_flight`,
shape [D, *action shape] in the action dtype (INT64 for discrete, FLOAT32 for continuous).
Missing, misshapen, NaN/Inf or out-of-range histories are refused as INVALID_ARGUMENT like
any other bad input; a history sent to a bundle that reads none is refused too, rather
than silently ignored. A bundle whose server keeps the history (history_source "server")
takes it from the stream's record when the request gives a tick
(server/stream_history.py). A chunking bundle (chunk_length H > 1) answers H actions: the
reply carries them all in `chunk` and the first in `action`, for clients that play one action.
"""

from __future__ import annotations

import numpy as np

from protos import policy_pb2 as pb
from server.errors import Kind, RequestError, echo
from server.models import PolicyModels
from server.stream_history import StreamHistory
from server.validation import DTYPE_NAMES, PROTO_DTYPES


def _invalid(message: str) -> RequestError:
    return RequestError(Kind.INVALID, message)


def history_sample(
    request: pb.ActRequest, models: PolicyModels, record: StreamHistory | None = None
) -> np.ndarray | None:
    """The request's actions in flight as the head's second input row, or None when the
    bundle's head reads none; RequestError(INVALID) when they are not what it reads.
    A server-history bundle's stream (`record`) fills them from its own answers when the
    request gives a tick instead (server/stream_history.py)."""
    spec, sent = models.history, request.HasField("actions_in_flight")
    if spec is None:
        if sent:
            raise _invalid(
                "this bundle's head reads no actions in flight (action_history 0); "
                "leave actions_in_flight unset"
            )
        return None
    want = f"{spec.dtype}{list(spec.shape)}"
    if not sent and models.realtime.server_history:
        if record is None:
            raise _invalid(
                f"this bundle's server keeps the last {spec.shape[0]} actions per stream: "
                f"use ActStream with tick and episode, or set actions_in_flight to {want}"
            )
        if request.tick < 1:
            raise _invalid(
                "this bundle's server keeps the actions in flight per stream: give each "
                "request its tick in the episode (1 for the first) and the episode number, "
                f"or set actions_in_flight to {want}"
            )
        return record.window(request.episode, request.tick)
    if not sent:
        raise _invalid(
            f"this bundle's head needs the last {spec.shape[0]} actions in flight: set "
            f"actions_in_flight to {want}, oldest first (a client older than the bundle?)"
        )
    t = request.actions_in_flight
    if t.codec != pb.CODEC_NONE or t.dtype != PROTO_DTYPES[spec.dtype]:
        got = DTYPE_NAMES.get(t.dtype, f"dtype #{t.dtype}")
        raise _invalid(f"actions_in_flight must be {want} with codec NONE, got {got}")
    if tuple(t.shape) != spec.shape:
        raise _invalid(
            f"actions_in_flight shape {echo(list(t.shape))} != expected {list(spec.shape)} "
            f"(the last {spec.shape[0]} actions, no batch dimension)"
        )
    size = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
    if len(t.data) != size:
        raise _invalid(f"actions_in_flight data is {len(t.data)} bytes; {want} needs {size}")
    history = np.frombuffer(t.data, np.dtype(spec.dtype).newbyteorder("<")).reshape(spec.shape)
    if models.action_type == "discrete":
        n = int(models.bundle.policy["action"]["n"])
        bad = int(np.count_nonzero((history < 0) | (history >= n)))
        if bad:
            raise _invalid(f"actions_in_flight has {bad} actions outside [0, {n})")
        return history.astype(np.int64)
    bad = int(np.count_nonzero(~np.isfinite(history)))
    if bad:
        raise _invalid(f"actions_in_flight contains NaN or Inf ({bad} values); send finite ones")
    return history.astype(np.float32)


def _tensor(a: np.ndarray) -> pb.Tensor:
    a = a.astype("<i8") if a.dtype.kind in "iu" else a.astype("<f4")
    return pb.Tensor(shape=list(a.shape), dtype=PROTO_DTYPES[a.dtype.name], data=a.tobytes())


def split_chunk(row: np.ndarray, models: PolicyModels) -> tuple[np.ndarray, pb.Tensor | None]:
    """(the action to put in `action`, the `chunk` tensor or None) for one output row."""
    if models.realtime.chunk_length == 1:
        return row, None
    chunk = np.asarray(row)
    if models.action_type == "discrete":
        chunk = chunk.reshape(-1, 1)  # [H, 1]: a discrete action is shape [1] on the wire
    return chunk[0], _tensor(chunk)
