"""Count XLA compilations: how many executables JAX builds while a block of code runs.

JAX records one ``/jax/core/compile/backend_compile_duration`` monitoring event per
executable it builds for a jit cache miss (also when the executable then comes from the
persistent compilation cache), tagged with the function's name. Counting those events
counts compilations, independent of timing::

    with CompileCounter() as compiles:
        swudi_jax.merge(base, experts)
    compiles.count, compiles.by_name()   # e.g. 7, {'jit(run)': 7}: one per shape group
"""

from __future__ import annotations

import threading
from collections import Counter

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Context manager collecting the names of the functions JAX compiles inside it."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()
        self._active = False

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if self._active and event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.names.append(str(kwargs.get("fun_name", "?")))

    @property
    def count(self) -> int:
        return len(self.names)

    def by_name(self) -> dict[str, int]:
        return dict(Counter(self.names))

    def __enter__(self) -> "CompileCounter":
        self._active = True
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        jax.monitoring.unregister_event_duration_listener(self._listener)


__all__ = ["BACKEND_COMPILE_EVENT", "CompileCounter"]
