"""The ``swudi-merge`` console script: signals held off from its first statement.

Importing any ``swudi_jax`` module imports the whole library (jax, XLA, orbax: seconds). A
Ctrl-C that lands inside those imports would otherwise raise KeyboardInterrupt in the middle
of a C extension's initialisation or of XLA's garbage-collection hook: a traceback, a crash
(SIGSEGV, SIGABRT), or an interrupt that is printed and dropped while the merge runs on. So
SIGINT, SIGTERM and SIGHUP (those the caller does not ignore) are *blocked* before anything
else runs: when this package is the program (``swudi-merge``, ``python -m swudi_jax_cli``), by
its first statements, before it imports anything further; otherwise by :func:`main`. Then
:mod:`swudi_jax.checkpoint.cli` is imported, and its ``main`` installs its handlers and only then
unblocks them. A signal sent during the imports stays pending and is delivered at that point:
the run stops with 128 + the signal number, without a traceback, and writes nothing. Once the
command has finished (or cleaned up), the process exits at once (``os._exit``, after flushing
its output), so a late signal cannot meet the interpreter's teardown, which resets the handlers
to the default action.

Before this package's first statement only Python's own start-up runs (the interpreter, then
``site`` with the environment's ``.pth`` files, e.g. an editable install's finder): a Ctrl-C
there gets Python's default behaviour, which no program can change: the process is killed by
SIGINT (a shell reports 130) or, inside a ``.pth`` file, Python prints that file's traceback.
Nothing of the merge has started then.
"""

from __future__ import annotations

import sys

# _signal is the interpreter's built-in C module (no Python code to run): `import signal` imports
# enum first, long enough for a Ctrl-C to land in it. The public module is imported once blocked.
import _signal

HANDLED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)


def _hold_signals() -> None:
    """Block the handled signals the caller does not ignore (cli.main unblocks them)."""
    held = [s for s in HANDLED_SIGNALS if _signal.getsignal(s) != _signal.SIG_IGN]
    _signal.pthread_sigmask(_signal.SIG_BLOCK, held)


def _is_program() -> bool:
    """Whether this import starts the program: ``python -m swudi_jax_cli`` or the ``swudi-merge``
    script (an ordinary ``import swudi_jax_cli`` leaves the importer's signals alone)."""
    orig, argv = getattr(sys, "orig_argv", []), sys.argv
    if argv[:1] == ["-m"]:  # python [options] -m swudi_jax_cli ARGS...: argv is ["-m", ARGS...] while it loads
        start = len(orig) - len(argv) - 1
        return orig[start:start + 2] == ["-m", __name__]
    return bool(argv) and argv[0].replace("\\", "/").rsplit("/", 1)[-1].startswith("swudi-merge")


if _is_program():
    _hold_signals()

import os  # noqa: E402 - after the signals are held
from collections.abc import Sequence  # noqa: E402
from typing import NoReturn  # noqa: E402


def main(argv: Sequence[str] | None = None) -> NoReturn:
    _hold_signals()  # threads started by the imports below inherit the blocked mask
    from swudi_jax.checkpoint import cli
    from swudi_jax.checkpoint.host_memory import return_freed_buffers

    return_freed_buffers()  # the program's allocator, never a library caller's (cli.main in-process)
    code = cli.main(argv, restore_signals=False)
    # the run is over and cleaned up (outputs fsynced): exit now, with the clean-up's handlers still
    # in place; the interpreter's teardown would reset them to the default action, so a late signal
    # would kill the process and change the exit status
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "HANDLED_SIGNALS",
    "main",
]
