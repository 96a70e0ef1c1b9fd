"""An overlapped three-stage executor: read the next group, merge this one, write the previous one.

``run_overlapped(items, read, compute, write)`` runs ``read(item)`` on a prefetch thread,
``compute(item, data)`` on the calling thread (where JAX dispatch, progress bars and signal
handlers live) and ``write(item, result)`` on a write-behind thread, each stage handing over
through a slot of depth 1:

- the prefetch thread starts reading item k + 1 only once the caller has taken item k, so at
  most two items' inputs exist at once (the one being merged, the one being read);
- the caller hands result k to the writer only once result k − 1 is written, so at most two
  items' results exist at once (the one being written, the one waiting), and the caller
  drops item k's inputs before it waits.

With a group cap G (``max_group_bytes``: (N + 2) × a group's bytes) the data held at once is
at most 2 × G: the sequential loop holds G. Results are produced by the same calls in the
same order as the sequential loop (:func:`run_sequential`), so they are bit-identical.

Any exception in a stage (or KeyboardInterrupt in the caller) stops the other stages: the
prefetch thread stops before its next read, the writer before its next write, both are
joined (a read or write in progress finishes first), and the first error is re-raised in
the caller, so the caller's cleanup (aborting the writer, removing the temporary output)
runs after every stage has stopped.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Iterable, Sequence

_DONE = object()


@dataclasses.dataclass
class StageTimes:
    """Busy seconds of each stage and the wall time of the whole run."""

    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0
    items: int = 0
    overlapped: bool = True

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def run_sequential(items: Sequence[Any], read: Callable, compute: Callable, write: Callable,
                   progress: Callable[[Iterable], Iterable] = iter) -> StageTimes:
    """The same stages one after the other (the reference the overlapped run must equal)."""
    times = StageTimes(overlapped=False)
    start = time.perf_counter()
    for item in progress(items):
        t = time.perf_counter()
        data = read(item)
        times.read_s += time.perf_counter() - t
        t = time.perf_counter()
        result = compute(item, data)
        del data
        times.compute_s += time.perf_counter() - t
        t = time.perf_counter()
        write(item, result)
        del result
        times.write_s += time.perf_counter() - t
        times.items += 1
    times.wall_s = time.perf_counter() - start
    return times


class _Overlap:
    """The state one overlapped run shares between its three threads (see :func:`run_overlapped`)."""

    def __init__(self, items: list, read: Callable, write: Callable, times: StageTimes):
        self.items, self.read, self.write, self.times = items, read, write, times
        self.stop = threading.Event()
        self.read_slot = threading.Semaphore(1)   # the caller releases it when it takes an item
        self.write_slot = threading.Semaphore(1)  # the writer releases it when it finished an item
        self.inputs: queue.Queue = queue.Queue()
        self.outputs: queue.Queue = queue.Queue()
        self.write_error: list[BaseException] = []

    def acquire(self, slot: threading.Semaphore) -> bool:
        while not self.stop.is_set():
            if slot.acquire(timeout=0.05):
                return True
        return False

    def reader(self) -> None:
        try:
            for item in self.items:
                if not self.acquire(self.read_slot):
                    return
                t = time.perf_counter()
                data = self.read(item)
                self.times.read_s += time.perf_counter() - t
                self.inputs.put((item, data))
                del data
            self.inputs.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
            self.inputs.put(_Failed(exc))

    def writer(self) -> None:
        while True:
            got = self.outputs.get()
            if got is _DONE or self.stop.is_set():
                return
            item, result = got
            del got
            try:
                t = time.perf_counter()
                self.write(item, result)
                self.times.write_s += time.perf_counter() - t
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
                self.write_error.append(exc)
                self.stop.set()
                return
            finally:
                del result
                self.write_slot.release()

    def compute_all(self, compute: Callable, progress: Callable[[Iterable], Iterable]) -> None:
        """The caller's loop: take each read item, compute it, hand the result to the writer."""
        for _ in progress(self.items):
            got = self.inputs.get()
            if isinstance(got, _Failed):
                raise got.error
            if self.write_error:
                raise self.write_error[0]
            item, data = got
            del got
            self.read_slot.release()  # the next read may start while this item merges
            t = time.perf_counter()
            result = compute(item, data)
            del data
            self.times.compute_s += time.perf_counter() - t
            if not self.acquire(self.write_slot) or self.write_error:  # the previous result is written (or failed)
                raise self.write_error[0]
            self.outputs.put((item, result))
            del result
            self.times.items += 1


def run_overlapped(items: Sequence[Any], read: Callable, compute: Callable, write: Callable,
                   progress: Callable[[Iterable], Iterable] = iter) -> StageTimes:
    """Run read → compute → write over ``items`` with the three stages overlapped (see the module).

    Args:
      items: the work items, in order (tensor groups).
      read: item → data, on the prefetch thread.
      compute: (item, data) → result, on the calling thread.
      write: (item, result) → None, on the write-behind thread, in item order.
      progress: wraps the caller's iteration (a progress bar).
    Returns:
      the stages' busy times and the wall time.
    Raises:
      the first exception any stage raised (the others are stopped and joined first).
    """
    run = _Overlap(list(items), read, write, StageTimes())
    threads = [threading.Thread(target=run.reader, name="swudi-prefetch", daemon=True),
               threading.Thread(target=run.writer, name="swudi-write-behind", daemon=True)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        run.compute_all(compute, progress)
        run.outputs.put(_DONE)
        threads[1].join()
        if run.write_error:
            raise run.write_error[0]
    except BaseException:
        run.stop.set()
        run.outputs.put(_DONE)
        raise
    finally:
        run.stop.set()
        for thread in threads:
            thread.join()
    run.times.wall_s = time.perf_counter() - start
    return run.times


__all__ = ["StageTimes", "run_overlapped", "run_sequential"]
