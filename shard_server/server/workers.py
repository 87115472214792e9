"""The threads engine calls run on: one model thread (with a heartbeat Health reads) and one I/O thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class EngineWorkers:
    """The one model thread every engine call runs on, plus one I/O thread for adapter downloads.

    Engine state (cached batches, KV blocks, CUDA streams, thread-local torch settings such as the current
    CUDA device) is only ever touched from `model`, so the engine needs no locks. `io` runs only
    `engine.download_adapter` and `engine.prepare_adapter`, which must therefore not touch engine state
    shared with the model thread (they fetch, read and pack files on the host).

    The model thread records which call it is running and since when (`current()`), so that Health can
    answer from another thread without queueing behind a long Prefill or Decode, and can tell a stuck
    call from a busy one. `clock` is injectable so that tests need not wait for real time to pass.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-model")
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-adapter-io")
        self.clock = clock
        # (name, start) of the call the model thread is running; None while idle. Written only by the
        # model thread; one attribute store, so a reader sees either the old or the new tuple.
        self._current: tuple[str, float] | None = None

    def model(self, fn: Callable[..., T], *args: Any) -> T:
        return self.submit_model(fn, *args).result()

    def submit_model(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._model.submit(self._run, fn, args)

    def io(self, fn: Callable[..., T], *args: Any) -> T:
        return self._io.submit(fn, *args).result()

    def current(self) -> tuple[str, float] | None:
        """(name, seconds it has run) of the model thread's call; None while the thread is idle."""
        call = self._current
        return None if call is None else (call[0], self.clock() - call[1])

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        self._model.shutdown(wait=True, cancel_futures=True)

    def _run(self, fn: Callable[..., T], args: tuple) -> T:
        self._current = (getattr(fn, "__name__", type(fn).__name__), self.clock())
        try:
            return fn(*args)
        finally:
            self._current = None
