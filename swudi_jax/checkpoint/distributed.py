"""``swudi-merge`` as P processes on JAX's multi-controller runtime (one process per host or per GPU).

Every process runs the same :func:`~swudi_jax.checkpoint.pipeline.merge_checkpoints` with
``distributed=True``; :class:`Team` is one process's part in it. Only JAX's runtime carries the
run: :func:`jax.distributed.initialize` (the coordinator, heartbeats), its key-value store (the
temporary folder's path, a step's outcome, a failure's message) and collectives over the
global devices (``multihost_utils.process_allgather``; gloo on CPU). In order:

1. **Agreement.** Each process hashes the config and merge options, the library versions and
   the input files (size and sampled content of every file); the digests are all-gathered and a
   process that differs is refused, naming it and what differs, before anything is written.
2. **The output.** Process 0 checks OUT, takes its lock and makes the temporary folder next to it
   (:class:`~swudi_jax.checkpoint.io.output.OutputSlot`: the single-process rules hold unchanged);
   the others read its path from the key-value store. OUT must be on a filesystem every process sees.
3. **The split.** Every process plans the same merge and the same assignment
   (:mod:`swudi_jax.checkpoint.work_split`): each group of tensors goes to one process, balanced by
   estimated cost; the layers too big for one device run on the global mesh, every process taking
   part (:mod:`swudi_jax.checkpoint.global_groups`).
4. **Whole-model passes** (SWUDI's alignment, TIES's whole-model trim) read each process's share of
   the chunks and meet through :meth:`Team.combine`: histograms summed, per-layer values gathered in
   model order, so every process decides the same options as one process would.
5. **Writing.** Process 0 lays out the output shards (headers written, files sized); each process
   writes its tensors' bytes into them at their offsets and closes its files. All processes then
   check in together (:meth:`Team.together`): a failure anywhere fails everyone.
6. **Publishing.** Process 0 writes the index, config, side files and card and moves the folder to
   OUT; the others wait for its outcome. The output is byte for byte the single-process merge's
   (the same software and BLAS thread settings: LAPACK's eigh rounds by its thread count).

Faults. A Python error on one process is posted to the key-value store; the others see it at their
next group (:meth:`Team.watch`) or check-in and fail with it; process 0 removes the temporary
folder. A process that dies (killed, out of memory) stops its heartbeats: JAX's runtime then ends
every other process with an error after ``heartbeat_timeout_s`` (a collective in flight fails at
once), and, as after a killed single-process run, the next run to OUT removes the temporary folder
left behind. Nothing is published unless every process finished writing.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np

from swudi_jax.checkpoint.fingerprint import fingerprint
from swudi_jax.checkpoint.io.output import OutputSlot
from swudi_jax.methods.spec import Combine

DEFAULT_WAIT_S = 3600
"""How long a process waits for process 0's step (laying out the shards, publishing) before failing."""

_RUNS = itertools.count()


class DistributedError(ValueError):
    """A distributed merge that cannot start, or that failed on some process."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               heartbeat_timeout_s: int | None = None) -> None:
    """Join JAX's distributed runtime (before any other JAX call), with gloo collectives on CPU.

    Args:
      coordinator: ``host:port`` of process 0's coordinator; None: from the cluster environment
        (SLURM, Open MPI, Cloud TPU, Kubernetes: whatever :func:`jax.distributed.initialize` detects).
      num_processes, process_id: P and this process's id in 0 … P − 1; None: from the environment.
      heartbeat_timeout_s: a process silent this long is taken as dead and every process stops
        (JAX's default: 100 s).
    JAX's preemption service is turned off, so that SIGTERM stops the merge like Ctrl-C.
    Raises:
      DistributedError: the runtime could not start (no cluster environment found, coordinator
        unreachable), saying what to pass.
    """
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service takes SIGTERM for itself (a training loop's checkpoint sync); a merge
    # has nothing to sync, and SIGTERM (scancel, a preemption) must stop it and remove its output
    jax.config.update("jax_enable_preemption_service", False)
    options = {} if heartbeat_timeout_s is None else {"heartbeat_timeout_seconds": int(heartbeat_timeout_s)}
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, **options)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise DistributedError(f"cannot start JAX's distributed runtime ({' '.join(str(exc).split())}); pass "
                               "--coordinator HOST:PORT --num-processes P --process-id I (or start the processes "
                               "under SLURM, Open MPI or on a Cloud TPU pod, which provide them)") from None


def _gather(array: np.ndarray) -> np.ndarray:
    """(P, *shape): every process's ``array`` (same shape and dtype everywhere), by process index."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(array)))


def _gather_ragged(array: np.ndarray) -> list[np.ndarray]:
    """Every process's 1-D ``array`` (same dtype, any length), by process index."""
    sizes = _gather(np.array([array.size], np.int64))[:, 0]
    padded = np.zeros(max(1, int(sizes.max())), array.dtype)
    padded[:array.size] = array
    return [row[:size] for row, size in zip(_gather(padded), sizes)]


class Team:
    """One process's part in a merge run by ``count`` processes (``count == 1``: a plain merge,
    every method below is then free of collectives)."""

    def __init__(self, index: int = 0, count: int = 1, client: Any = None, wait_s: float = DEFAULT_WAIT_S):
        self.index, self.count, self.client, self.wait_s = index, count, client, wait_s
        self.prefix = f"swudi-merge/{next(_RUNS) if count > 1 else 'solo'}"  # the n-th distributed merge of each process
        self.positions: Callable[[str], list[int]] = lambda leaves: []
        self.work = None

    @classmethod
    def start(cls, distributed: bool) -> "Team":
        """A one-process team, or, with ``distributed``, this process's place in JAX's runtime
        (:func:`initialize` from the environment when the caller has not started it)."""
        if not distributed:
            return cls()
        initialize()
        from jax._src import distributed as runtime  # the runtime's key-value client (no public accessor)

        return cls(jax.process_index(), jax.process_count(), runtime.global_state.client)

    @property
    def lead(self) -> bool:
        return self.index == 0

    # -- agreement and the output ------------------------------------------------------------

    def agree(self, prints: Mapping[str, bytes]) -> None:
        """Refuse to start unless every process has the same fingerprints (:func:`fingerprint`)."""
        if self.count == 1:
            return
        names = list(prints)
        mine = np.frombuffer(b"".join(prints[n] for n in names), np.uint8).reshape(len(names), -1)
        everyone = _gather(mine)
        for k, name in enumerate(names):
            differ = [p for p in range(self.count) if not np.array_equal(everyone[p, k], everyone[0, k])]
            if differ:
                raise DistributedError(f"process(es) {differ} of {self.count} have other {name} than process 0: "
                                       "every process must run the same config with the same swudi_jax and "
                                       "JAX versions on the same input files; nothing was written")

    @contextlib.contextmanager
    def output_slot(self, out: Path, force: bool, config, options: Mapping[str, Any]) -> Iterator[Any]:
        """Process 0's :class:`OutputSlot` (lock, temporary folder, final move); on the others a
        stand-in holding the same temporary folder, read from process 0. First, every process must
        run the same merge (:meth:`agree` on :func:`fingerprint` of ``config`` and ``options``)."""
        if self.count > 1:
            self.agree(fingerprint(config, options))
        if self.count == 1:
            with OutputSlot(out, force=force) as slot:
                yield slot
            return
        with self._reporting():
            if self.lead:
                with OutputSlot(out, force=force) as slot:
                    self.lead_step("slot", lambda: str(slot.tmp))
                    yield slot
                return
            yield SimpleNamespace(tmp=Path(self.lead_step("slot", None)), publish=lambda: None)

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        """Post this process's failure for the others to name; a collective that failed because another
        process failed (its connection closed) is reported as that process's failure."""
        try:
            yield
        except DistributedError:
            raise
        except BaseException as exc:
            self._post_failure(exc)
            others = {k: v for k, v in self._failures().items() if k != self.index} \
                if isinstance(exc, jax.errors.JaxRuntimeError) else {}
            if others:
                self._raise_failures(others)
            raise

    # -- steps, failures and check-ins -------------------------------------------------------

    def lead_step(self, name: str, fn: Callable[[], str | None] | None) -> str:
        """Process 0 runs ``fn`` and posts its outcome; the others wait for it (at most
        :attr:`wait_s`) and get its result, or fail with its error."""
        key = f"{self.prefix}/step/{name}"
        if self.count == 1:
            return fn() or ""
        if self.lead:
            try:
                result = fn() if fn is not None else None
            except BaseException as exc:
                self.client.key_value_set(key, f"error\n{_message(exc)}")
                raise
            self.client.key_value_set(key, f"ok\n{result or ''}")
            return result or ""
        try:
            status, _, payload = self.client.blocking_key_value_get(key, int(self.wait_s * 1000)).partition("\n")
        except Exception as exc:  # noqa: BLE001 - the runtime's timeout or lost coordinator, named
            raise DistributedError(f"process {self.index}: no word from process 0 on step {name!r} "
                                   f"({' '.join(str(exc).split())[:300]})") from None
        if status != "ok":
            raise DistributedError(f"process 0 failed ({name}): {payload}")
        return payload

    def _post_failure(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{self.prefix}/failed/{self.index}", _message(exc))

    def _failures(self) -> dict[int, str]:
        """The failures posted so far, by process (none when the coordinator cannot be reached)."""
        try:
            found = self.client.key_value_dir_get(f"{self.prefix}/failed/")
        except Exception:  # noqa: BLE001 - the runtime is going down; its own error stands
            return {}
        return {int(key.rsplit("/", 1)[1]): value for key, value in found}

    def _raise_failures(self, failures: Mapping[int, str]) -> None:
        first = min(failures)
        raise DistributedError(f"process {first} of {self.count} failed: {failures[first]}"
                               + (f" (and processes {sorted(failures)[1:]})" if len(failures) > 1 else ""))

    def watch(self, items: Iterable) -> Iterator:
        """``items``, stopping with the failure of another process as soon as one is posted."""
        for item in items:
            if self.count > 1:
                failures = self._failures()
                if failures:
                    self._raise_failures(failures)
            yield item

    @contextlib.contextmanager
    def together(self, step: str) -> Iterator[None]:
        """A block every process runs on its own share (no collectives inside); at its end all
        processes check in, and if it failed anywhere it fails everywhere, naming the process."""
        if self.count == 1:
            yield
            return
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, DistributedError):
                self._post_failure(exc)
            self._check_in(step, failed=True)
            raise
        self._check_in(step, failed=False)

    def _check_in(self, step: str, failed: bool) -> None:
        flags = _gather(np.array([failed], np.uint8))[:, 0]
        if failed or not flags.any():
            return
        failures = self._failures()
        self._raise_failures(failures or {int(np.argmax(flags)): f"failed in {step}"})

    def all(self, flags: Sequence[bool]) -> list[bool]:
        """Elementwise AND of ``flags`` over the processes."""
        if self.count == 1:
            return list(flags)
        return [bool(v) for v in _gather(np.asarray(flags, np.uint8).reshape(-1)).all(axis=0)]

    # -- the split and the writer ------------------------------------------------------------

    def assign(self, plan, resolved, multi_device: bool | str):
        """This process's share (:func:`~swudi_jax.checkpoint.work_split.split_work`); refuses outputs
        that several processes cannot fill (only safetensors shards can be written in parts)."""
        from swudi_jax.checkpoint.work_split import split_work

        if self.count > 1 and plan.out_format != "safetensors":
            raise DistributedError(f"a distributed merge writes safetensors only (the output format here is "
                                   f"{plan.out_format}); set `out_format: safetensors` in the config")
        work = split_work(plan, resolved, multi_device, self.index, self.count)
        self.positions = lambda leaves: work.positions(plan, leaves)
        self.work = work
        return work

    def open_writer(self, target: Path, plan, entries: Mapping[str, Any], **options):
        """The weights writer: one process's writer over the whole output, or, in a team, process 0
        lays the shards out and each process opens them to write the tensors of its own groups."""
        from swudi_jax.checkpoint import io as ckio
        from swudi_jax.checkpoint.io.safetensors_io import SafetensorsWriter

        if self.count == 1:
            return ckio.open_writer(target, plan.out_format, entries, **options)
        keys = [p.path for g in self.work.local for p in plan.groups[g]]
        if self.lead:
            made = []
            self.lead_step("layout", lambda: made.append(SafetensorsWriter(target, entries, keys=keys, **options)))
            return made[0]
        self.lead_step("layout", None)
        return SafetensorsWriter(target, entries, keys=keys, create=False, **options)

    # -- whole-model passes ------------------------------------------------------------------

    def combine(self, leaves: str) -> Combine:
        """How a whole-model pass over ``leaves`` meets across processes (:class:`Combine`);
        :attr:`positions` gives the model-order index of each chunk this process reads."""
        if self.count == 1:
            from swudi_jax.methods.spec import LOCAL

            return LOCAL
        return Combine(sum=self._sum, in_order=lambda values: self._in_order(values, self.positions(leaves)))

    def _sum(self, statistic: np.ndarray | None) -> np.ndarray | None:
        mine = None if statistic is None else np.asarray(statistic)
        head = _head(mine)
        heads = _gather(head)
        have = [p for p in range(self.count) if heads[p, 0] >= 0]
        if not have:
            return None
        dtype, shape = _from_head(heads[have[0]])
        everyone = _gather(np.zeros(shape, dtype) if mine is None else mine.astype(dtype, copy=False))
        total = everyone[0].copy()
        for row in everyone[1:]:
            total += row
        return total

    def _in_order(self, values: Sequence[Any], positions: Sequence[int]) -> list[np.ndarray]:
        if len(values) != len(positions):
            raise DistributedError(f"process {self.index}: a whole-model pass gave {len(values)} values for "
                                   f"{len(positions)} chunks")
        values = [np.asarray(v) for v in values]
        heads = _gather(_head(values[0] if values else None))
        have = [p for p in range(self.count) if heads[p, 0] >= 0]
        if not have:
            return []
        dtype = _from_head(heads[have[0]])[0]
        table = np.array([[pos, v.ndim, *v.shape, *[-1] * (_MAX_NDIM - v.ndim)] for pos, v in zip(positions, values)],
                         np.int64).reshape(-1, 2 + _MAX_NDIM)
        flat = np.concatenate([v.astype(dtype).ravel() for v in values]) if values else np.zeros(0, dtype)
        found: dict[int, np.ndarray] = {}
        for rows, data in zip(_gather_ragged(table.ravel()), _gather_ragged(flat)):
            start = 0
            for row in rows.reshape(-1, 2 + _MAX_NDIM):
                shape = tuple(int(d) for d in row[2:2 + row[1]])
                size = int(np.prod(shape, dtype=np.int64))
                found[int(row[0])] = data[start:start + size].reshape(shape)
                start += size
        return [found[k] for k in sorted(found)]


_CODES = tuple(np.dtype(t) for t in (np.int64, np.float64, np.float32, np.int32, np.uint32, np.uint64, np.uint8))
_MAX_NDIM = 8


def _head(array: np.ndarray | None) -> np.ndarray:
    """(ndim, dtype code, shape padded with −1) of ``array``; −1 everywhere for None."""
    head = np.full(2 + _MAX_NDIM, -1, np.int64)
    if array is not None:
        if array.dtype not in _CODES or array.ndim > _MAX_NDIM:
            raise DistributedError(f"a whole-model statistic of dtype {array.dtype} and {array.ndim} dimensions "
                                   f"cannot be combined across processes (dtypes {[str(c) for c in _CODES]})")
        head[0], head[1], head[2:2 + array.ndim] = array.ndim, _CODES.index(array.dtype), array.shape
    return head


def _from_head(head: np.ndarray) -> tuple[np.dtype, tuple[int, ...]]:
    return _CODES[int(head[1])], tuple(int(d) for d in head[2:2 + int(head[0])])


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}"


__all__ = ["DEFAULT_WAIT_S", "DistributedError", "Team", "initialize"]
