"""Concurrent `toolkit serve` requests decoded together (`serve.batch_requests`; backends that batch).

A transformers model decodes a batch of sentences in about the time of one (on an H200, gpt-oss-20b's step takes
47 ms at 128 rows and 67 ms at 256: bench/results/translate_speed-2026-12-03-h200.md), but it is not thread-safe,
so `toolkit serve` runs one backend call at a time, and ten clients sending one sentence each used to wait for
ten calls. Here requests are queued instead. One worker thread takes the oldest with the others of the same
prompt (direction, options, glossary: `PromptSpec` equality), in arrival order up to `max_texts` texts in all,
and hands them to the backend as one call; each request gets its own slice of the results, in its own order.
Under load, the requests that arrive while a call runs form the next call, with no wait added. A request
that finds no call running starts at once, unless `window_s` (`serve.batch_window_ms`) lets it wait until it
is that old for others to join it.

One request's bad input must not fail its neighbours: when a joint call raises, each of its requests is
translated again on its own, so the error reaches only the request that caused it. A request cancelled
while it waits (the client timed out) is dropped from its call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class _Job:
    texts: list[str]
    key: Any  # requests decode together only when their keys are equal (serve: the PromptSpec)
    at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class Batcher:
    """Calls `run(texts, key)` for groups of submitted requests, from one thread of its own.

    Each `submit` returns a Future of `(started, results, ended)`: the joint call's start and end times
    (`time.perf_counter`) and the request's own results.
    """

    def __init__(self, run: Callable[[list[str], Any], list[Any]], *, window_s: float, max_texts: int) -> None:
        if window_s < 0 or max_texts < 1:
            raise ValueError(f"Batcher: window_s {window_s} must be >= 0 and max_texts {max_texts} >= 1")
        self._run, self.window_s, self.max_texts = run, window_s, max_texts
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str], key: Any) -> Future:
        job = _Job(list(texts), key)
        with self._cond:
            if self._closed:
                raise RuntimeError("Batcher: closed")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Stop taking requests; those still queued are cancelled, a running call finishes."""
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.future.cancel()
            self._jobs.clear()
            self._cond.notify()

    # ---- the worker thread ----------------------------------------------------------------------

    def _group(self) -> tuple[list[_Job], bool]:
        """The jobs that decode with the oldest one: same key, whole jobs in arrival order up to max_texts texts
        (the oldest always; none overtakes a matching job that did not fit), and whether the group is full."""
        first = self._jobs[0]
        group, size = [first], len(first.texts)
        for job in self._jobs[1:]:
            if job.key != first.key:
                continue
            if size + len(job.texts) > self.max_texts:
                return group, True
            group.append(job)
            size += len(job.texts)
        return group, size >= self.max_texts

    def _take(self) -> list[_Job]:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return []
            deadline = self._jobs[0].at + self.window_s
            while True:
                group, full = self._group()
                left = deadline - time.monotonic()
                if full or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            taken = {id(job) for job in group}
            self._jobs = [job for job in self._jobs if id(job) not in taken]
            return group

    def _loop(self) -> None:
        while group := self._take():
            live = [job for job in group if job.future.set_running_or_notify_cancel()]
            if live:
                try:
                    self._serve(live)
                except BaseException as exc:  # noqa: BLE001  (the thread must live on; each future learns why)
                    for job in live:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _serve(self, jobs: list[_Job]) -> None:
        texts = [text for job in jobs for text in job.texts]
        started = time.perf_counter()
        try:
            results = self._run(texts, jobs[0].key)
            if len(results) != len(texts):
                raise RuntimeError(f"backend returned {len(results)} results for {len(texts)} texts")
        except Exception as exc:  # noqa: BLE001  (whatever the backend raised goes to the request(s) it concerns)
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            log.warning("batcher: a joint call of %d requests failed (%s); each runs again alone", len(jobs), exc)
            for job in jobs:
                self._serve([job])
            return
        ended = time.perf_counter()
        start = 0
        for job in jobs:
            job.future.set_result((started, results[start:start + len(job.texts)], ended))
            start += len(job.texts)
