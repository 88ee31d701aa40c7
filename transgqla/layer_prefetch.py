"""Compute converted layers ahead of the writer, on background threads.

Why: a conversion is IO (copying the MLP, embedding and norm tensors, hashing, fsync) interleaved
with per-layer attention math. Done in turn, their times add up; with the math one or two layers
ahead on the other core, the math hides under the copying (benchmarks/scale.py measures both).

What stays fixed: every layer is computed by one thread with a fixed torch thread count, so every
result is the same function of its inputs as without the threads, whatever the timing; with one
worker (calibrated conversions, whose layer ``l`` needs layers ``< l`` first) layers are computed
strictly in order. With two workers (data-free: layers are independent) two layers are computed at
once, which also uses the time the writer spends waiting.

Errors raised by the work reach the caller at ``get``. ``close()`` (on success, error or Ctrl-C)
stops the layers being computed and joins the threads: a thread still inside torch when the
interpreter exits aborts the process, which would turn a clean "interrupted, rerun with --resume"
into a crash. Waiting for the layer to finish instead took minutes on a calibrated 8B layer, so the
work runs under a torch function mode that checks the stop flag before every torch call and abandons
the layer (:class:`LayerAbandoned`) once it is set: ``close()`` returns within one torch op. The check
changes no result; threads the work starts itself are not covered (they end with their batch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
from typing import Callable, Generic, Iterable, TypeVar

import torch
from torch.overrides import TorchFunctionMode

T = TypeVar("T")
_POLL_S = 0.2


class LayerAbandoned(Exception):
    """Raised inside a layer's work when the prefetcher was closed (Ctrl-C, an error elsewhere)."""


class _StopCheck(TorchFunctionMode):
    """Before every torch call on this thread: raise :class:`LayerAbandoned` once ``stop`` is set."""

    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop = stop

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.stop.is_set():
            raise LayerAbandoned("the layer was abandoned: the conversion is stopping")
        return func(*args, **(kwargs or {}))


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed by this thread back to the OS (glibc ``malloc_trim``). A worker thread
    allocates from its own malloc arena, and without this, freed layer-sized temporaries stay
    mapped in it: measured +7 MB of peak RSS per layer (16 vs 48 layers, benchmarks/memory_scaling.py)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class LayerPrefetcher(Generic[T]):
    """``get(layer)`` returns ``work(layer)``; layers must be asked for in the order given.

    ``workers`` threads share the layers round-robin (layer ``i`` of the order goes to worker
    ``i % workers``), each computing its layers in order; use one worker when layer ``l`` needs the
    layers before it (calibration), none to compute in ``get`` itself (no overlap). ``ahead`` is
    how many finished layers per worker may wait for the caller (each holds its output tensors).
    ``threads`` pins torch's intra-op thread count on the workers (bitwise reproducibility).
    """

    def __init__(self, work: Callable[[int], T], layers: Iterable[int], *, ahead: int = 1, threads: int = 1,
                 workers: int = 1):
        self._order = list(layers)
        self._next = 0
        self._stop = threading.Event()
        self._work = work if workers == 0 else None  # 0 workers: compute in get(), on the caller's thread
        if workers == 0:
            torch.set_num_threads(threads)
        n = 0 if workers == 0 else max(1, min(workers, len(self._order) or 1))
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=max(1, ahead)) for _ in range(n)]
        self._threads = [
            threading.Thread(target=self._run, args=(work, self._order[k::n], self._queues[k], threads),
                             name=f"transgqla-layers-{k}")
            for k in range(n)
        ]
        for t in self._threads:
            t.start()

    def _put(self, results: queue.Queue, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                results.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, work: Callable[[int], T], layers: list[int], results: queue.Queue, threads: int) -> None:
        torch.set_num_threads(threads)
        for layer in layers:
            if self._stop.is_set():
                return
            try:
                with _StopCheck(self._stop):
                    item = (layer, work(layer), None)
            except BaseException as exc:  # handed to the caller, who decides (none is left when stopped)
                self._put(results, (layer, None, exc))
                return
            release_freed_memory()
            if not self._put(results, item):
                return

    def get(self, layer: int) -> T:
        if self._next >= len(self._order) or self._order[self._next] != layer:
            expected = self._order[self._next] if self._next < len(self._order) else None
            raise ValueError(f"layer {layer} asked for out of order (next planned: {expected})")
        self._next += 1
        if self._work is not None:
            return self._work(layer)
        results = self._queues[(self._next - 1) % len(self._queues)]
        got, result, exc = results.get()
        assert got == layer, (got, layer)
        if exc is not None:
            self.close()
            raise exc
        return result

    def close(self) -> None:
        """Abandon the layers being computed (at their next torch call) and wait for the threads;
        pending results are dropped."""
        self._stop.set()
        for results in self._queues:
            try:
                while True:
                    results.get_nowait()
            except queue.Empty:
                pass
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    def __enter__(self) -> "LayerPrefetcher[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
