"""Checks on the paths a command will write, made before its work starts.

A command that fails to write its result after minutes of work, or that names a
hidden temporary file in its error, wastes the user's time; these checks name the
path the user gave and what to do instead, at once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def _existing_ancestor(path: str) -> str:
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def _check_takes_files(folder: str, what: str, path: str) -> None:
    """Raises ``ValueError`` unless a file can be created in ``folder`` (made and removed at once)."""
    try:  # the only sure test: root passes os.access even where the file system refuses files
        fd, probe = tempfile.mkstemp(prefix=".vda-jax-write-test-", dir=folder)
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be written: {folder} does not take new files "
                         f"({e.strerror or e}); choose another path") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)


def check_output_folder(path: str, what: str) -> None:
    """Raises ``ValueError`` unless ``path`` is, or can be made, a directory that takes files."""
    parent = _existing_ancestor(path)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {path} cannot be a folder: {parent} is a file; choose another path")
    _check_takes_files(parent, what, path)


def check_output_file(path: str, what: str, *, suffixes: tuple[str, ...] = (), overwrite: bool = True) -> None:
    """Raises ``ValueError`` (``FileExistsError``) unless a file can be written at ``path``.

    Args:
      path: the file to write; its folder may be missing (it is then created).
      what: how the user named it (``--output``), for the message.
      suffixes: the file name must end in one of these, if given.
      overwrite: whether an existing file may be replaced.
    """
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder; name a file in it")
    if suffixes and not path.endswith(suffixes):
        raise ValueError(f"{what} {path} must end in {' or '.join(suffixes)}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass --overwrite")
    parent = _existing_ancestor(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {path} cannot be written: {parent} is a file; choose another path")
    _check_takes_files(parent, what, path)
