"""The real-time loop against a scripted client on a fake clock: exact action ages.

Reply delays are whole ticks of 0.25 s (exact in binary floating point), so every arrival
lands on a tick's due time and the expected ages below are worked out by hand."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import gymnasium
import numpy as np
import pytest

from edge.client import ClientConfig, PolicyClient
from edge.realtime import Reply, Sent, age_summary, declared_rate_hz, nearest_rank, run_realtime
from edge.wire import to_tensor
from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from splitedge.bundle import load_bundle
from splitedge.errors import SplitedgeError
from tests.conftest import ZOO_BUNDLE as ZOO

T = 0.25
DEFAULT = -1


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)


class ScriptedPolicy:
    """Answers each observation with the observation itself (the tick it was taken at),
    `delays[i]` ticks after the i-th send (None: the reply is lost)."""

    default_action = DEFAULT

    def __init__(self, clock: FakeClock, delays: list[int | None]):
        self.clock, self.delays = clock, list(delays)
        self.in_flight: list[tuple[float, int, Any]] = []  # (arrival, step, action)
        self.step = 0

    def send(self, frame: Any) -> Sent:
        self.step += 1
        delay = self.delays.pop(0)
        if delay is not None:
            self.in_flight.append((self.clock.now() + delay * T, self.step, frame))
        return Sent(self.step, encode_ms=0.5, bytes_up=100)

    def poll(self) -> list[Reply]:
        now = self.clock.now()
        due = sorted((r for r in self.in_flight if r[0] <= now), key=lambda r: r[0])
        self.in_flight = [r for r in self.in_flight if r[0] > now]
        return [Reply(step, action, arrived, bytes_down=20) for arrived, step, action in due]


class TickEnv(gymnasium.Env):  # type: ignore[type-arg]
    """Observation: the number of ticks so far (across episodes); reward 1 a step."""

    observation_space = gymnasium.spaces.Discrete(1000)
    action_space = gymnasium.spaces.Discrete(1000, start=-1)

    def __init__(self, episode_len: int = 1000):
        self.episode_len, self.ticks, self.in_episode = episode_len, 0, 0
        self.applied: list[int] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        self.in_episode = 0
        return self.ticks, {}

    def step(self, action: Any) -> Any:
        self.applied.append(action)
        self.ticks += 1
        self.in_episode += 1
        return self.ticks, 1.0, self.in_episode >= self.episode_len, False, {}


def _run(delays: list[int | None], ticks: int, env: TickEnv | None = None, **kw: Any):
    clock = FakeClock()
    env = env or TickEnv()
    result = run_realtime(ScriptedPolicy(clock, delays), env, T, ticks, clock=clock, **kw)
    return result, env


def test_constant_delay_gives_that_age_after_default_ticks() -> None:
    result, env = _run([2] * 10, 10, drain_s=0.0)
    assert result.ages == [None, None] + [2] * 8
    assert env.applied == [DEFAULT, DEFAULT, *range(8)]
    s = age_summary(result.ages)
    assert (s["age_p50"], s["age_p95"], s["age_max"]) == (2, 2, 2)
    assert s["age_hist"] == {"2": 8} and s["default_ticks"] == 2
    assert s["stale_share"] == 1.0
    # the last two requests were still in flight and the loop did not wait for them
    answered = [r for r in result.records if not r.fallback]
    assert [r.total_ms for r in answered] == pytest.approx([500.0] * 8)
    assert sum(r.fallback for r in result.records) == 2
    assert result.overruns == 0 and result.unsent == 0


def test_jittered_out_of_order_and_lost_replies() -> None:
    delays = [0, 3, 1, 1, 4, 0, 2, None, 1, 0]
    # by hand, arrival ticks: r0@0 r1@4 r2@3 r3@4 r4@8 r5@5 r6@8 (r7 lost) r8@9 r9@9;
    # the newest observation answered so far at each tick: 0 0 0 2 3 5 5 5 6 9
    # (r1 at tick 4 and r4 at tick 8 arrive after newer answers: not applied)
    result, env = _run(delays, 10, drain_s=1.0)
    assert env.applied == [0, 0, 0, 2, 3, 5, 5, 5, 6, 9]
    assert result.ages == [0, 1, 2, 1, 1, 0, 1, 2, 2, 0]
    s = age_summary(result.ages)
    assert s["age_hist"] == {"0": 3, "1": 4, "2": 3}
    assert s["stale_share"] == pytest.approx(7 / 10)
    ref = np.asarray(result.ages)  # independent reference: numpy's inverted-CDF percentile
    assert s["age_p50"] == np.percentile(ref, 50, method="inverted_cdf") == 1
    assert s["age_p95"] == np.percentile(ref, 95, method="inverted_cdf") == 2
    latency = {r.step: r.total_ms for r in result.records if not r.fallback}
    expected = {i + 1: 1e3 * T * d for i, d in enumerate(delays) if d is not None}
    assert latency == pytest.approx(expected)
    (lost,) = [r for r in result.records if r.fallback]
    assert lost.step == 8 and "no reply" in lost.error  # the 8th request, r7


def test_in_flight_cap_skips_sends_instead_of_queueing() -> None:
    # delay 3, at most 2 outstanding; replies are taken before sending, so a slot freed this
    # tick is used this tick. Sent at 0, 1; full at 2; 3 and 4 send (r0, r1 back); full at 5;
    # 6, 7 send; full at 8; 9 sends.
    result, env = _run([3] * 10, 10, max_in_flight=2)
    assert result.unsent == 3
    assert env.applied == [DEFAULT] * 3 + [0, 1, 1, 3, 4, 4, 6]
    assert result.ages == [None, None, None, 3, 3, 4, 3, 3, 4, 3]


def test_new_episode_drops_the_held_action_and_old_replies() -> None:
    result, env = _run([1] * 8, 8, env=TickEnv(episode_len=4))
    # tick 4 starts episode 2: the reply to tick 3's observation (episode 1) is not applied
    assert env.applied == [DEFAULT, 0, 1, 2, DEFAULT, 4, 5, 6]
    assert result.ages == [None, 1, 1, 1, None, 1, 1, 1]
    assert result.episode_returns == [4.0, 4.0] and result.partial_return == 0.0


def test_a_device_kept_history_is_what_has_arrived_else_the_held_action() -> None:
    """A format /1 delay-aware bundle: the device sends, for the 2 ticks before each, the
    action chosen for it if its reply has arrived, else the one it holds. Replies take 2
    ticks and answer with their tick, so by hand tick k sends [k-2, k-2] (k-1's reply is
    still on its way) and the first two send the default twice."""
    from splitedge.realtime_spec import RealtimeSpec

    class Known(ScriptedPolicy):
        realtime = RealtimeSpec(action_history=2)

        def send(self, frame: Any, actions_in_flight: Any = None, tick: int = 0,
                 episode: int = 0) -> Sent:  # fmt: skip
            self.windows.append(list(actions_in_flight))
            return super().send(frame)

    clock = FakeClock()
    policy = Known(clock, [2] * 6)
    policy.windows = []  # type: ignore[attr-defined]
    run_realtime(policy, TickEnv(), T, 6, clock=clock)
    want = [[DEFAULT, DEFAULT], [DEFAULT, DEFAULT], [0, 0], [1, 1], [2, 2], [3, 3]]
    assert policy.windows == want  # type: ignore[attr-defined]


def test_a_server_kept_history_is_sent_as_ticks_in_the_episode() -> None:
    """A bundle whose server keeps the actions in flight gets, per send, the observation's
    tick in its episode (from 1) and an episode id unique to the run: by hand, two
    episodes of 3 ticks give ticks 1 2 3 1 2 3 and two ids that differ by one."""
    from splitedge.realtime_spec import RealtimeSpec

    class Kept(ScriptedPolicy):
        realtime = RealtimeSpec(action_history=2, history_source="server")

        def send(self, frame: Any, actions_in_flight: Any = None, tick: int = 0,
                 episode: int = 0) -> Sent:  # fmt: skip
            assert actions_in_flight is None
            self.sent.append((tick, episode))
            return super().send(frame)

    clock = FakeClock()
    runs = []
    for _ in range(2):
        policy = Kept(clock, [1] * 6)
        policy.sent = []  # type: ignore[attr-defined]
        result = run_realtime(policy, TickEnv(episode_len=3), T, 6, clock=clock)
        runs.append(policy.sent)  # type: ignore[attr-defined]
        assert result.strategy == "delay-aware (history 2, server-kept)"
    for sent in runs:
        assert [t for t, _ in sent] == [1, 2, 3, 1, 2, 3]
        first, second = sent[0][1], sent[3][1]
        assert first >= 1 and second == first + 1 and {e for _, e in sent} == {first, second}
    assert runs[0][0][1] != runs[1][0][1]  # another run on the same stream: other ids


def test_zero_delay_is_age_zero_and_nothing_stale() -> None:
    result, env = _run([0] * 5, 5)
    assert result.ages == [0] * 5 and env.applied == [0, 1, 2, 3, 4]
    assert age_summary(result.ages)["stale_share"] == 0.0


def test_overrun_ticks_are_counted() -> None:
    clock = FakeClock()

    class SlowEnv(TickEnv):
        def step(self, action: Any) -> Any:
            if self.ticks == 2:
                clock.t += 2.5 * T  # one step that takes 2.5 periods: ticks 3 and 4 start late
            return super().step(action)

    env = SlowEnv()
    result = run_realtime(ScriptedPolicy(clock, [0] * 8), env, T, 8, clock=clock)
    # tick 3 is due at 0.75 s and starts at 0.5 + 0.625 = 1.125 (late by 1.5 periods);
    # tick 4 due 1.0: late by 0.5, under a period; the rest are on time
    assert result.overruns == 1


def test_nearest_rank_and_declared_rates() -> None:
    assert nearest_rank([5, 1, 3, 2, 4], 50) == 3
    assert nearest_rank([1, 2, 3, 4], 50) == 2 and nearest_rank([1, 2, 3, 4], 51) == 3
    assert nearest_rank([7], 95) == 7
    from edge.envs import make_env

    # gymnasium's documented step lengths: CartPole tau = 0.02 s, Pendulum dt = 0.05 s
    assert declared_rate_hz(make_env("cartpole-pixels")) == pytest.approx(50.0)
    assert declared_rate_hz(make_env("pendulum-pixels")) == pytest.approx(20.0)
    assert declared_rate_hz(make_env("reacher-pixels")) is None
    with pytest.raises(ValueError, match="period_s > 0"):
        run_realtime(ScriptedPolicy(FakeClock(), []), TickEnv(), 0.0, 3)


class HeldPolicy(pb_grpc.PolicyServicer):
    """Answers step s with action s % 2 at once, except step 1, held until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Hello(self, request, context):  # noqa: N802 (gRPC method names)
        return pb.HelloReply(session_id=3, bundle_name=request.bundle_name)

    def ActStream(self, request_iterator, context):  # noqa: N802
        out: queue.Queue[pb.ActReply | None] = queue.Queue()

        def answer(step: int) -> None:
            if step == 1:
                self.release.wait(30)
            out.put(pb.ActReply(step=step, action=to_tensor(np.array([step % 2], np.int64))))

        def read() -> None:
            try:
                for r in request_iterator:
                    threading.Thread(target=answer, args=(r.step,), daemon=True).start()
            except grpc.RpcError:
                pass
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (reply := out.get()) is not None:
            yield reply


def _poll_until(client: PolicyClient, count: int) -> list[Reply]:
    got: list[Reply] = []
    end = time.monotonic() + 30  # a bound for a broken test, not a measurement
    while len(got) < count and time.monotonic() < end:
        got += client.poll()
        time.sleep(0.01)
    return got


def test_policy_client_sends_without_waiting_and_matches_replies_by_step() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = HeldPolicy()
    pb_grpc.add_PolicyServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cfg = ClientConfig(server=f"127.0.0.1:{port}", backend="ort")
    frame = np.zeros((3, 48, 48), np.uint8)
    try:
        with PolicyClient(load_bundle(ZOO), cfg).connect() as client:
            assert client.default_action == 0
            first, second = client.send(frame), client.send(frame)  # the first is held back
            assert first is not None and second is not None
            assert (first.step, second.step) == (1, 2) and first.bytes_up > 64
            (reply,) = _poll_until(client, 1)
            assert (reply.step, reply.action) == (2, 0)  # overtook the held one
            servicer.release.set()
            (late,) = _poll_until(client, 1)
            assert (late.step, late.action) == (1, 1) and late.arrived >= reply.arrived
            assert client.late_replies == 0 and client.fallbacks == 0
        unary = PolicyClient(load_bundle(ZOO), ClientConfig(server=cfg.server, rpc="unary"))
        with pytest.raises(SplitedgeError, match="needs rpc='stream'"):
            unary.send(frame)
        unary.close()
    finally:
        servicer.release.set()
        server.stop(0)
