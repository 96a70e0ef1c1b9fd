"""Timing and peak-memory helpers shared by the benchmarks.

- :func:`compile_timed` compiles a ``jax.jit`` function ahead of time and says how long that took,
  so compilation never leaks into a run time.
- :func:`time_calls` runs a function ``warmup`` times untimed, then ``repeats`` times, each
  ending in ``jax.block_until_ready``, and keeps every time (the median is what tables show).
- :func:`reset_peak_rss` / :func:`peak_rss_since_reset_bytes` measure the peak of one phase
  (the timed calls, without the compiler's transient memory) inside a process.
- :func:`measured_process` runs a command under a fresh launcher and reads its peak resident set
  size from ``os.wait4`` (the kernel's ``ru_maxrss`` of that command alone, not inherited from
  the benchmark's own memory); :func:`run_worker` runs one measurement that way in its own
  Python subprocess, so each method's peak memory is its own.
- :func:`machine_info` records what the numbers were measured on: cores, load, BLAS
  (through threadpoolctl when installed), library versions, ``OPENBLAS_*``/``XLA_FLAGS``.
- :func:`write_json` writes a benchmark's result file atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Sequence

RESULT_MARKER = "@@RESULT@@"
"""A worker prints one line starting with this marker followed by its JSON result."""


class Timing(NamedTuple):
    """Wall times of repeated calls in seconds; ``median`` is the figure to report."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _block(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def compile_timed(jitted: Any, *args: Any) -> tuple[Callable[..., Any], float]:
    """Lower and compile a ``jax.jit``-wrapped function for ``args``; returns (compiled, seconds)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_calls(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` timed times (results blocked on)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        _block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return Timing(times)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ``ru_maxrss`` in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS mark (Linux ``/proc/self/clear_refs`` "5"), so that
    :func:`peak_rss_since_reset_bytes` covers only what runs next (e.g. not compilation).
    Returns False where the kernel offers no such reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_bytes() -> int | None:
    """Peak RSS since :func:`reset_peak_rss` (``VmHWM`` of /proc/self/status), None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` (folders created), through ``<name>.tmp`` and a
    rename, so an interrupted run never leaves a half-written result."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def emit_result(result: dict) -> None:
    """Print a worker's result where :func:`run_worker` will find it (the last marked line)."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


LAUNCHER = (
    "import json, os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "json.dump({'returncode': os.waitstatus_to_exitcode(status), 'maxrss': usage.ru_maxrss,\n"
    "           'cpu_s': usage.ru_utime + usage.ru_stime}, open(sys.argv[1], 'w'))\n"
)
"""The process between a benchmark and what it measures (see :func:`measured_process`)."""


def measured_process(argv: Sequence[str], *, env: dict | None = None, cwd: str | None = None,
                     stdout: Any = None, stderr: Any = None) -> dict:
    """Run ``argv`` to completion: its exit code, wall seconds, CPU seconds and peak RSS in bytes.

    Linux starts a child's ``ru_maxrss`` at the resident size of the process that forked it (the
    memory the fork copied, or with ``vfork`` shared, counts until ``exec``), so a child of a
    benchmark that holds gigabytes would report those gigabytes. The command therefore runs under
    a fresh launcher (:data:`LAUNCHER`, a bare Python of about 25 MB), which reads the command's
    own ``ru_maxrss`` from ``os.wait4``. ``stdout``/``stderr`` as for ``subprocess.Popen``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "usage.json")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", LAUNCHER, report, *argv], env=env, cwd=cwd, stdout=stdout,
                       stderr=stderr, check=False)
        wall = time.perf_counter() - start
        with open(report) as f:
            usage = json.load(f)
    scale = 1 if sys.platform == "darwin" else 1024
    return {"returncode": usage["returncode"], "wall_s": wall, "cpu_s": usage["cpu_s"],
            "peak_rss_bytes": usage["maxrss"] * scale}


def run_worker(argv: Sequence[str], *, cwd: str | None = None, env: dict | None = None) -> dict:
    """Run ``argv`` (a Python worker) in its own process; return its result plus its peak RSS.

    The child must print its result with :func:`emit_result`. Its peak resident set size
    (``peak_rss_bytes`` key; :func:`measured_process`) and the wall time of the whole child
    (imports included, ``process_s``) are added. A failing child raises ``RuntimeError`` with
    the tail of its output.
    """
    with tempfile.TemporaryFile(mode="w+") as out:
        usage = measured_process(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        out.seek(0)
        text = out.read()
    if usage["returncode"] != 0:
        raise RuntimeError(f"worker {' '.join(argv)} exited with {usage['returncode']}:\n{text[-4000:]}")
    lines = [line for line in text.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        raise RuntimeError(f"worker {' '.join(argv)} printed no result:\n{text[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_MARKER):])
    return {**result, "peak_rss_bytes": usage["peak_rss_bytes"], "process_s": usage["wall_s"]}


def blas_info() -> list[dict]:
    """The BLAS/OpenMP libraries loaded in this process (threadpoolctl), or [] without it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "version", "num_threads", "architecture", "filepath")
    return [{k: info.get(k) for k in keys} for info in threadpool_info()]


def machine_info() -> dict:
    """Cores, load average, library versions and the BLAS/XLA settings of this run."""
    import jax
    import numpy as np

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "numpy": np.__version__,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_", "XLA_FLAGS"))},
    }
    try:
        import scipy

        info["scipy"] = scipy.__version__
        import scipy.linalg  # noqa: F401 - loads scipy's BLAS so threadpoolctl sees it
    except ImportError:
        info["scipy"] = None
    info["blas"] = blas_info()
    return info
