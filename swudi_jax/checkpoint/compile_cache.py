"""JAX's persistent compilation cache for swudi_jax: a second run of the same shapes compiles nothing.

XLA compiles one program per layer-shape group (and a few small helpers) per process; on a
small model that is most of a merge's wall time. :func:`enable_compile_cache` turns on JAX's
persistent compilation cache (https://docs.jax.dev/en/latest/persistent_compilation_cache.html)
in a swudi_jax folder, with the size and compile-time thresholds at zero so that small
programs are cached too. Entries are keyed by the program, the JAX/XLA versions, the device
and the compile options, so a stale entry is never reused; the folder can be deleted at any
time.

Where (first that applies):

1. ``SWUDI_JAX_COMPILE_CACHE=0`` (or ``off``, ``false``, ``no``, ``none``): no cache;
2. ``SWUDI_JAX_COMPILE_CACHE=/some/path``: that folder;
3. a cache folder already configured for JAX by the user (``JAX_COMPILATION_CACHE_DIR`` or
   ``jax.config.update("jax_compilation_cache_dir", ...)``): left as it is;
4. ``$XDG_CACHE_HOME/swudi_jax/jax``, by default ``~/.cache/swudi_jax/jax``.

The folder is created with mode 0700: JAX treats cache entries as trusted code, so the cache
must not be writable by others. A folder that cannot be created only gives a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV_VAR = "SWUDI_JAX_COMPILE_CACHE"
"""Environment variable: ``0``/``off`` disables the cache, a path relocates it."""
OFF_VALUES = frozenset({"0", "off", "false", "no", "none"})


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/swudi_jax/jax``, or ``~/.cache/swudi_jax/jax`` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swudi_jax" / "jax"


def resolve_cache_dir(setting: str | os.PathLike | None = None) -> Path | None:
    """The cache folder for ``setting`` (default: the ``SWUDI_JAX_COMPILE_CACHE`` variable);
    None when the setting switches the cache off."""
    value = os.environ.get(ENV_VAR, "") if setting is None else os.fspath(setting)
    value = value.strip()
    if value.lower() in OFF_VALUES:
        return None
    return Path(value).expanduser() if value else default_cache_dir()


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache for this process; return its folder (None: off).

    Args:
      path: the folder, or ``"off"``/``"0"`` to leave the cache off. Default: the
        ``SWUDI_JAX_COMPILE_CACHE`` variable, else a folder the user already configured for
        JAX, else ``$XDG_CACHE_HOME/swudi_jax/jax`` (see the module docstring).
    Returns:
      The cache folder in use, or None when the cache is off (or its folder could not be made).

    Safe to call more than once and after JAX has compiled something (the cache then applies
    to later compilations). Thresholds: every program is cached, whatever its compile time
    or size (``jax_persistent_cache_min_compile_time_secs = 0``,
    ``jax_persistent_cache_min_entry_size_bytes = -1``).
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    explicit = path is not None or os.environ.get(ENV_VAR, "").strip() != ""
    current = jax.config.jax_compilation_cache_dir
    if not explicit and current:
        folder: Path | None = Path(current)
    else:
        folder = resolve_cache_dir(path)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        warnings.warn(f"swudi_jax: compilation cache folder {folder} unavailable ({exc}); continuing without it",
                      stacklevel=2)
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if current != str(folder):
        jax.config.update("jax_compilation_cache_dir", str(folder))
        # JAX decides once per process whether the cache is in use (at the first compile);
        # start that decision afresh so that a cache set after earlier compiles applies
        compilation_cache.reset_cache()
    return folder


__all__ = ["ENV_VAR", "OFF_VALUES", "default_cache_dir", "enable_compile_cache", "resolve_cache_dir"]
