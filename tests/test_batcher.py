"""DynamicBatcher on its own: batch sizes, each caller gets its own row, errors reach the right callers."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from server.batcher import DynamicBatcher
from tests.conftest import ROOT

TIMEOUT = 10.0


class Recorder:
    """A run_batch that doubles its input, records batch sizes, and can be held at a gate."""

    def __init__(self, poison: int | None = None, sleep_s: float = 0.0):
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.poison, self.sleep_s = poison, sleep_s

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        time.sleep(self.sleep_s)
        if self.poison is not None and (x == self.poison).any():
            raise ValueError(f"poison {self.poison} in batch")
        return x * 2


def test_waiting_samples_are_batched_up_to_max_batch() -> None:
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch=4, max_delay_s=0.0)
    rec.gate.clear()
    first = b.submit(np.array([0]))
    assert rec.entered.wait(TIMEOUT)  # the worker is now busy with a batch of 1
    futures = [b.submit(np.array([i])) for i in range(1, 11)]  # 10 queue up meanwhile
    rec.gate.set()
    assert first.result(TIMEOUT)[0].tolist() == [0]
    assert [f.result(TIMEOUT)[0].tolist() for f in futures] == [[2 * i] for i in range(1, 11)]
    b.close(TIMEOUT)
    assert rec.sizes == [1, 4, 4, 2]
    assert b.stats() == {"batches": 4, "samples": 11, "mean_batch": 11 / 4, "max_batch_seen": 4}


def test_lone_sample_does_not_wait_with_zero_delay() -> None:
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch=64, max_delay_s=0.0)
    row, queue_s, compute_s = b.submit(np.array([3.0])).result(TIMEOUT)
    b.close(TIMEOUT)
    assert row.tolist() == [6.0] and rec.sizes == [1]
    assert queue_s >= 0 and compute_s >= 0


def test_delay_gathers_samples_that_arrive_within_it() -> None:
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch=3, max_delay_s=5.0)
    futures = [b.submit(np.array([1]))]
    time.sleep(0.05)  # well inside the 5 s window
    futures += [b.submit(np.array([2])), b.submit(np.array([3]))]  # fills the batch: runs at once
    assert [f.result(TIMEOUT)[0].tolist() for f in futures] == [[2], [4], [6]]
    assert rec.sizes == [3]
    # a partial batch goes when the delay runs out, holding its first sample about that long
    b2 = DynamicBatcher(rec, max_batch=8, max_delay_s=0.1)
    partial = [b2.submit(np.array([i])) for i in range(2)]
    results = [f.result(TIMEOUT) for f in partial]
    assert rec.sizes == [3, 2]
    assert results[0][1] >= 0.1 - 1e-3  # queue time of the first >= the delay, by construction
    b.close(TIMEOUT)
    b2.close(TIMEOUT)


def test_concurrent_callers_each_get_their_own_row() -> None:
    rec = Recorder(sleep_s=0.002)  # slow enough that batches form
    b = DynamicBatcher(rec, max_batch=16, max_delay_s=0.0)
    n_threads, per_thread = 8, 40
    wrong: list[tuple[int, int, list[int]]] = []

    def caller(t: int) -> None:
        for k in range(per_thread):
            sample = np.array([t, k, t * 1000 + k])
            row = b.submit(sample).result(TIMEOUT)[0]
            if row.tolist() != (sample * 2).tolist():
                wrong.append((t, k, row.tolist()))

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    b.close(TIMEOUT)
    assert not wrong
    assert sum(rec.sizes) == n_threads * per_thread
    assert max(rec.sizes) > 1  # concurrency really produced batches
    assert max(rec.sizes) <= 16


def test_exception_reaches_only_the_culprits_future() -> None:
    rec = Recorder(poison=7)
    b = DynamicBatcher(rec, max_batch=8, max_delay_s=0.0)
    rec.gate.clear()
    b.submit(np.array([0]))
    assert rec.entered.wait(TIMEOUT)
    futures = {i: b.submit(np.array([i])) for i in (5, 7, 9)}  # one batch of 3 with the poison
    rec.gate.set()
    with pytest.raises(ValueError, match="poison 7"):
        futures[7].result(TIMEOUT)
    assert futures[5].result(TIMEOUT)[0].tolist() == [10]
    assert futures[9].result(TIMEOUT)[0].tolist() == [18]
    assert rec.sizes == [1, 3, 1, 1, 1]  # the failed batch of 3, then each sample alone
    # a lone failing sample fails alone, and the worker keeps going afterwards
    with pytest.raises(ValueError):
        b.submit(np.array([7])).result(TIMEOUT)
    assert b.submit(np.array([1])).result(TIMEOUT)[0].tolist() == [2]
    b.close(TIMEOUT)


def test_wrong_row_count_and_mismatched_shapes_are_errors_not_hangs() -> None:
    b = DynamicBatcher(lambda x: np.float64(0.0), max_batch=8)  # no batch dim in the output
    with pytest.raises(ValueError, match=r"returned shape \(\) for a batch of 1"):
        b.submit(np.zeros(2)).result(TIMEOUT)
    b.close(TIMEOUT)
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch=8)
    rec.gate.clear()
    b.submit(np.zeros(2))
    assert rec.entered.wait(TIMEOUT)
    good, odd = b.submit(np.ones(2)), b.submit(np.ones(3))  # cannot be stacked together
    rec.gate.set()
    assert good.result(TIMEOUT)[0].tolist() == [2, 2]
    assert odd.result(TIMEOUT)[0].tolist() == [2, 2, 2]
    b.close(TIMEOUT)


def test_close_answers_queued_samples_then_refuses_new_ones() -> None:
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch=2)
    rec.gate.clear()
    futures = [b.submit(np.array([i])) for i in range(5)]
    assert rec.entered.wait(TIMEOUT)
    closer = threading.Thread(target=b.close, args=(TIMEOUT,))
    closer.start()
    rec.gate.set()
    closer.join(TIMEOUT)
    assert [f.result(0)[0].tolist() for f in futures] == [[0], [2], [4], [6], [8]]
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(np.array([0]))
    assert b.closed


def test_cancelled_future_is_skipped() -> None:
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch=8)
    rec.gate.clear()
    b.submit(np.array([0]))
    assert rec.entered.wait(TIMEOUT)
    gone, kept = b.submit(np.array([1])), b.submit(np.array([2]))
    assert gone.cancel()
    rec.gate.set()
    assert kept.result(TIMEOUT)[0].tolist() == [4]
    b.close(TIMEOUT)
    assert rec.sizes == [1, 1]


def test_compute_time_covers_the_model_call() -> None:
    rec = Recorder(sleep_s=0.05)
    b = DynamicBatcher(rec, max_batch=4)
    _, queue_s, compute_s = b.submit(np.array([1])).result(TIMEOUT)
    b.close(TIMEOUT)
    assert compute_s >= 0.05 - 1e-3  # run_batch sleeps 50 ms: a lower bound from theory
    assert 0 <= queue_s


def test_bad_arguments_name_their_values() -> None:
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        DynamicBatcher(lambda x: x, max_batch=0)
    with pytest.raises(ValueError, match="got -1"):
        DynamicBatcher(lambda x: x, max_delay_s=-1)


def test_batcher_imports_no_grpc() -> None:
    import subprocess

    code = "import sys; sys.modules['grpc'] = None; import server.batcher; print('ok')"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
