"""JAX's persistent compilation cache, on by default wherever vda-jax compiles.

Compiled steps are stored on disk, keyed by the program and the shapes (the weights
are arguments, never constants), so a second process running the same model size
and frame size loads them instead of compiling again, whatever the checkpoint.

The long-video window programs are kept whole beside it (``executables``), found
without tracing them.

The directory is ``$VDA_JAX_CACHE_DIR`` or ``~/.cache/vda-jax/xla``; set
``VDA_JAX_CACHE_DIR=off`` to turn the cache off. A cache directory the user gave
JAX already (``jax_compilation_cache_dir``) is left as it is.
"""

from __future__ import annotations

import os

import jax

DIR_ENV = "VDA_JAX_CACHE_DIR"
_OFF = ("off", "none", "0", "false", "")


def cache_dir() -> str | None:
    """The directory vda-jax caches compiled programs in, or None when turned off."""
    directory = os.environ.get(DIR_ENV, os.path.join(os.path.expanduser("~"), ".cache", "vda-jax", "xla"))
    return None if directory.strip().lower() in _OFF else directory


def enable() -> str | None:
    """Points JAX's persistent cache at ``cache_dir()`` unless JAX has one; returns the directory in use.

    Takes effect for compilations after the call (JAX reads the setting at its first
    compile), so it runs when vda-jax's inference modules are imported.
    """
    current = jax.config.jax_compilation_cache_dir
    if current is None and (directory := cache_dir()) is not None:
        jax.config.update("jax_compilation_cache_dir", directory)
        # Every program, however fast it compiles: a warm process should compile nothing.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        return directory
    return current
