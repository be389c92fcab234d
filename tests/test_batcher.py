"""toolkit/batcher.py: waiting requests decoded as one backend call, each given its own results."""

from __future__ import annotations

import threading
import time

import pytest

from toolkit.batcher import Batcher


class Backend:
    """Records each call; answers `key:text`; fails on a text "bad"; can hold a call until released."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str]] = []
        self.hold: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, texts: list[str], key: str) -> list[str]:
        self.calls.append((list(texts), key))
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(10), "test never released the backend"
        if "bad" in texts:
            raise ValueError("bad input")
        return [f"{key}:{t}" for t in texts]


def results(future) -> list[str]:
    return future.result(timeout=10)[1]


def test_requests_within_the_window_share_one_call_and_keep_their_own_results():
    backend = Backend()
    batcher = Batcher(backend, window_s=0.3, max_texts=16)
    try:
        futures = [batcher.submit(["a", "b"], "k"), batcher.submit(["c"], "k"), batcher.submit(["d", "e"], "k")]
        assert [results(f) for f in futures] == [["k:a", "k:b"], ["k:c"], ["k:d", "k:e"]]
        assert backend.calls == [(["a", "b", "c", "d", "e"], "k")]
        started, _, ended = futures[0].result()
        assert futures[2].result()[0] == started and ended >= started  # the joint call's times, for every request
    finally:
        batcher.close()


def test_different_keys_and_the_size_limit_make_separate_calls():
    backend = Backend()
    batcher = Batcher(backend, window_s=0.3, max_texts=3)
    try:
        futures = [batcher.submit(["a", "b"], "zh"), batcher.submit(["x"], "nan"), batcher.submit(["c", "d"], "zh"),
                   batcher.submit(["e"], "zh")]
        assert [results(f) for f in futures] == [["zh:a", "zh:b"], ["nan:x"], ["zh:c", "zh:d"], ["zh:e"]]
    finally:
        batcher.close()
    # in arrival order: a, b alone (c, d would pass 3, and e does not overtake them), the other key, then the rest
    assert backend.calls == [(["a", "b"], "zh"), (["x"], "nan"), (["c", "d", "e"], "zh")]


def test_no_window_means_no_wait_and_requests_queued_behind_a_call_join_the_next():
    backend = Backend()
    backend.hold = threading.Event()
    batcher = Batcher(backend, window_s=0.0, max_texts=16)
    try:
        first = batcher.submit(["a"], "k")
        assert backend.entered.wait(10)  # running alone: nothing waited for
        later = [batcher.submit([t], "k") for t in "bcd"]
        backend.hold.set()
        assert results(first) == ["k:a"] and [results(f) for f in later] == [["k:b"], ["k:c"], ["k:d"]]
    finally:
        batcher.close()
    assert backend.calls == [(["a"], "k"), (["b", "c", "d"], "k")]


def test_a_failing_text_fails_only_its_own_request():
    backend = Backend()
    batcher = Batcher(backend, window_s=0.3, max_texts=16)
    try:
        good, bad, other = batcher.submit(["a"], "k"), batcher.submit(["bad"], "k"), batcher.submit(["c"], "k")
        assert results(good) == ["k:a"] and results(other) == ["k:c"]
        with pytest.raises(ValueError, match="bad input"):
            bad.result(timeout=10)
    finally:
        batcher.close()
    assert backend.calls[0] == (["a", "bad", "c"], "k") and len(backend.calls) == 4  # joint, then each alone


def test_a_wrong_number_of_results_is_an_error_not_a_shifted_answer():
    batcher = Batcher(lambda texts, key: texts[:-1], window_s=0.0, max_texts=16)
    try:
        with pytest.raises(RuntimeError, match="1 results for 2 texts"):
            batcher.submit(["a", "b"], "k").result(timeout=10)
    finally:
        batcher.close()


def test_a_cancelled_request_is_dropped_and_close_cancels_the_queue():
    backend = Backend()
    backend.hold = threading.Event()
    batcher = Batcher(backend, window_s=0.0, max_texts=16)
    first = batcher.submit(["a"], "k")
    assert backend.entered.wait(10)
    gone, kept = batcher.submit(["b"], "k"), batcher.submit(["c"], "k")
    assert gone.cancel()  # the client gave up while it waited
    backend.hold.set()
    assert results(first) == ["k:a"] and results(kept) == ["k:c"]
    assert backend.calls == [(["a"], "k"), (["c"], "k")]
    backend.hold = threading.Event()
    backend.entered.clear()
    running = batcher.submit(["d"], "k")
    assert backend.entered.wait(10)
    queued = batcher.submit(["e"], "k")
    batcher.close()
    assert queued.cancelled()
    backend.hold.set()
    assert results(running) == ["k:d"]  # a running call finishes
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(["f"], "k")


def test_the_window_is_counted_from_the_oldest_request():
    backend = Backend()
    batcher = Batcher(backend, window_s=0.2, max_texts=16)
    try:
        started = time.monotonic()
        assert results(batcher.submit(["a"], "k")) == ["k:a"]
        waited = time.monotonic() - started
        assert 0.15 <= waited < 5  # a lone request waits for the window, no longer
        assert results(batcher.submit(["b"] * 16, "k")) == ["k:b"] * 16  # a full call starts at once
    finally:
        batcher.close()
    with pytest.raises(ValueError):
        Batcher(backend, window_s=-1, max_texts=1)
