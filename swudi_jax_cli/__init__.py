"""The ``swudi-merge`` console script: signals held off from the first instant of the process.

Importing any ``swudi_jax`` module imports the whole library (jax, XLA, orbax: seconds). A
Ctrl-C that lands inside those imports would otherwise raise KeyboardInterrupt in the middle
of a C extension's initialisation or of XLA's garbage-collection hook: a traceback, a crash
(SIGSEGV, SIGABRT), or an interrupt that is printed and dropped while the merge runs on. This
module imports nothing heavy: it *blocks* SIGINT, SIGTERM and SIGHUP (those the caller does not
ignore), then imports :mod:`swudi_jax.checkpoint.cli`, whose ``main`` installs its handlers and
only then unblocks them. A signal sent during the imports stays pending and is delivered at
that point: the run stops with 128 + the signal number and writes nothing. Once the command has
finished (or cleaned up), the process exits at once (``os._exit``, after flushing its output), so a
late signal cannot meet the interpreter's teardown, which resets the handlers to the default action.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    handled = [s for s in HANDLED_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    from swudi_jax.checkpoint import cli  # threads started by these imports inherit the blocked mask

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
