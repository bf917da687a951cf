"""Compiled programs kept whole on disk and found again without tracing them.

JAX's persistent cache (``compilation_cache``) keys a program by its lowered HLO, so a
process that finds a program there has still traced and lowered it: for the two window
programs of 720p frames at input 112 about a second on a 2-core CPU. This store keys a
program by what determines it before tracing: the caller's description of it (model
configuration and compute options, argument shapes, mesh, compiler options), the devices
it runs on, vda-jax's source files, the versions of Python, NumPy, JAX, jaxlib and Flax,
JAX's configuration and ``XLA_FLAGS``. It keeps the serialized executable, which a later
process loads without tracing (JAX's cache is not asked for these programs). It lives in
the ``executables`` folder of the compilation cache's directory and is off when that
cache is; an entry that cannot be read is compiled again and replaced.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import flax
import jax
import jaxlib
import numpy as np
from jax._src import config as jax_config  # enable_compilation_cache: a thread-local setting
from jax.experimental import serialize_executable

from vda_jax import compilation_cache

_COVERED_MODULES = ("vda_jax.", "flax.", "builtins")  # classes whose code the key covers
HIT_EVENT = "/vda_jax/executables/hit"  # jax.monitoring events, one per program looked up
MISS_EVENT = "/vda_jax/executables/miss"


class Key(NamedTuple):
    """Where one program is stored, and the devices it runs on."""

    path: str
    devices: tuple[jax.Device, ...]


@functools.cache
def _toolchain() -> str:
    """A digest of vda-jax's source files and of the versions of what compiles them."""
    digest = hashlib.sha256(repr((sys.version, np.__version__, jax.__version__, jaxlib.__version__,
                                  flax.__version__)).encode())
    package = os.path.dirname(os.path.abspath(__file__))
    for folder, subfolders, files in os.walk(package):
        subfolders.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, package).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def key(description: object, devices: Sequence[jax.Device], types: Iterable[type] = ()) -> Key | None:
    """The store's entry for the program ``description`` describes (its ``repr`` must say all the
    caller knows of it), built from objects of ``types`` and run on ``devices``.

    None when the compilation cache is off, or when one of ``types`` is defined outside
    vda-jax and Flax (a model class of the user's): the key covers only their source.
    """
    directory = compilation_cache.enable()
    if directory is None or any(not t.__module__.startswith(_COVERED_MODULES) for t in types):
        return None
    placement = tuple((d.platform, d.device_kind, d.id, d.process_index) for d in devices)
    text = repr((_toolchain(), sorted(jax.config.values.items()), os.environ.get("XLA_FLAGS", ""), placement,
                 description))
    name = hashlib.sha256(text.encode()).hexdigest()
    return Key(os.path.join(directory, "executables", f"{name}.pkl"), tuple(devices))


def load(entry: Key | None) -> jax.stages.Compiled | None:
    """The stored program, or None (nothing stored, the store off, or an entry that cannot be read)."""
    if entry is None:
        return None
    try:
        with open(entry.path, "rb") as f:
            serialized, in_tree, out_tree = pickle.load(f)
        compiled = serialize_executable.deserialize_and_load(serialized, in_tree, out_tree,
                                                             execution_devices=entry.devices)
    except Exception:  # missing, cut short by a crash of another version, or from another jaxlib: compile it
        jax.monitoring.record_event(MISS_EVENT)
        return None
    jax.monitoring.record_event(HIT_EVENT)
    return compiled


def save(entry: Key | None, compiled: jax.stages.Compiled) -> jax.stages.Compiled:
    """Stores ``compiled`` and returns it. Atomic: a reader never sees part of an entry. A program
    that cannot be stored (a full disk, a host callback in it) runs all the same: a warning says why."""
    if entry is None:
        return compiled
    folder = os.path.dirname(entry.path)
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(descriptor, "wb") as f:
            pickle.dump(serialize_executable.serialize(compiled), f)
        os.replace(temporary, entry.path)
    except Exception as e:  # noqa: BLE001 (storing is an optimisation: the compiled program is good)
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        warnings.warn(f"vda-jax: the compiled program is not stored in {folder} ({type(e).__name__}: {e}); "
                      f"a later process compiles it again", RuntimeWarning, stacklevel=2)
    return compiled


def compile_and_store(entry: Key | None, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """Compiles ``lowered`` and stores the program (``save``); returns it.

    With an entry, JAX's persistent cache is not asked (in this thread): an executable
    that cache loads cannot be serialized whole again (XLA:CPU in jaxlib 0.10: the copy
    fails at run time, "Function ... not found"), and the store stands in for it.
    """
    if entry is None:
        return lowered.compile()
    with jax_config.enable_compilation_cache(False):
        compiled = lowered.compile()
    return save(entry, compiled)


def load_or_start_compile(entry: Key | None, lower: Callable[[], jax.stages.Lowered]) -> concurrent.futures.Future:
    """The stored program, else ``lower()`` compiled and stored (``compile_and_store``) on a thread
    of its own: the caller goes on (lowering another program, running one) while XLA compiles,
    which does not hold Python's lock. The future's ``result()`` is the program (or the error)."""
    if (stored := load(entry)) is not None:
        future = concurrent.futures.Future()
        future.set_result(stored)
        return future
    lowered = lower()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
    future = pool.submit(compile_and_store, entry, lowered)
    pool.shutdown(wait=False)  # the thread ends when the compile does
    return future
