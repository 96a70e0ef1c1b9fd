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
    items = list(items)
    times = StageTimes()
    stop = threading.Event()
    read_slot = threading.Semaphore(1)   # the caller releases it when it takes an item
    write_slot = threading.Semaphore(1)  # the writer releases it when it finished an item
    inputs: queue.Queue = queue.Queue()
    outputs: queue.Queue = queue.Queue()
    write_error: list[BaseException] = []

    def acquire(slot: threading.Semaphore) -> bool:
        while not stop.is_set():
            if slot.acquire(timeout=0.05):
                return True
        return False

    def reader() -> None:
        try:
            for item in items:
                if not acquire(read_slot):
                    return
                t = time.perf_counter()
                data = read(item)
                times.read_s += time.perf_counter() - t
                inputs.put((item, data))
                del data
            inputs.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
            inputs.put(_Failed(exc))

    def writer() -> None:
        while True:
            got = outputs.get()
            if got is _DONE or stop.is_set():
                return
            item, result = got
            del got
            try:
                t = time.perf_counter()
                write(item, result)
                times.write_s += time.perf_counter() - t
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
                write_error.append(exc)
                stop.set()
                return
            finally:
                del result
                write_slot.release()

    threads = [threading.Thread(target=reader, name="swudi-prefetch", daemon=True),
               threading.Thread(target=writer, name="swudi-write-behind", daemon=True)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        for _ in progress(items):
            got = inputs.get()
            if isinstance(got, _Failed):
                raise got.error
            if write_error:
                raise write_error[0]
            item, data = got
            del got
            read_slot.release()  # the next read may start while this item merges
            t = time.perf_counter()
            result = compute(item, data)
            del data
            times.compute_s += time.perf_counter() - t
            if not acquire(write_slot) or write_error:  # the previous result is written (or the writer failed)
                raise write_error[0]
            outputs.put((item, result))
            del result
            times.items += 1
        outputs.put(_DONE)
        threads[1].join()
        if write_error:
            raise write_error[0]
    except BaseException:
        stop.set()
        outputs.put(_DONE)
        raise
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    times.wall_s = time.perf_counter() - start
    return times


__all__ = ["StageTimes", "run_overlapped", "run_sequential"]
