"""Reads PyTorch and safetensors checkpoints into numpy arrays, without torch.

A ``torch.save`` file (torch >= 1.6) is a zip archive holding ``<name>/data.pkl``, the
pickled object, one ``<name>/data/<key>`` record of raw bytes per storage, and a
``<name>/byteorder`` record. The pickle is read by an unpickler that resolves only the
few globals a dict of tensors needs, each to a small numpy stand-in defined here, so a
crafted checkpoint cannot run code: any other global is refused before it is called.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, and the raw little-endian data.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import math
import os
import pathlib
import pickle
import re
import struct
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # the first opcode of a protocol-2+ pickle: the pre-1.6 torch format

_STORAGE_DTYPES = {
    ("torch", "FloatStorage"): np.float32,
    ("torch", "HalfStorage"): np.float16,
    ("torch", "BFloat16Storage"): ml_dtypes.bfloat16,
    ("torch", "DoubleStorage"): np.float64,
    ("torch", "LongStorage"): np.int64,
    ("torch", "IntStorage"): np.int32,
    ("torch", "ShortStorage"): np.int16,
    ("torch", "CharStorage"): np.int8,
    ("torch", "ByteStorage"): np.uint8,
    ("torch", "BoolStorage"): np.bool_,
    ("torch", "UntypedStorage"): np.uint8,
    ("torch.storage", "UntypedStorage"): np.uint8,
}

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file, the problem and the fix."""


class _DamagedArchive(Exception):
    """A torch zip archive whose records are missing or unreadable."""


def checkpoint_kind(path: str | os.PathLike[str]) -> str:
    """"pth" or "safetensors": what a checkpoint file holds, recognised by its first bytes, not its name.

    Raises:
      CheckpointError: ``path`` is missing, a folder, or neither kind of file.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; give the official .pth or .safetensors "
                              "file")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give the official .pth or .safetensors file")
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC):
        return "pth"
    # A safetensors JSON header follows its 8-byte length, whose first byte can be the pickle
    # marker 0x80 (a 128..255-byte header): then only a header that parses tells them apart.
    if head[8:9] == b"{" and (not head.startswith(_PICKLE_PROTO) or _has_json_header(path)):
        return "safetensors"
    if head.startswith(_PICKLE_PROTO):
        return "pth"
    raise CheckpointError(f"{path}: not a checkpoint (expected a PyTorch .pth zip archive or a safetensors file)")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` or safetensors checkpoint, recognised by its content, not its name."""
    return read_safetensors(path) if checkpoint_kind(path) == "safetensors" else read_pth(path)


def read_pth(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads the tensors of a ``torch.save`` zip checkpoint.

    The file may hold the state dict itself or a dict wrapping it one level down, e.g.
    ``{"model": state_dict, "epoch": 7}``; the wrapper's other entries are dropped.

    Returns:
      ``{name: array}`` in file order, arrays C-contiguous in native byte order with the
      tensors' dtypes (``ml_dtypes.bfloat16`` for bfloat16).
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head.startswith(_PICKLE_PROTO):
        raise CheckpointError(
            f"{path}: legacy (pre-1.6, non-zip) PyTorch checkpoint; re-save it with torch >= 1.6: "
            "torch.save(torch.load(path), path)"
        )
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            obj = _unpickle(archive)
    except (zipfile.BadZipFile, _DamagedArchive) as e:
        raise _corrupt(path, e) from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return _state_dict(obj, path)


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads every tensor of a safetensors file (``__metadata__`` is ignored).

    Returns:
      ``{name: array}`` in header order, arrays in native byte order.
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the header length")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise _corrupt(path, f"a {header_len}-byte header in a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:  # invalid UTF-8 or JSON
            raise _corrupt(path, f"unreadable header: {e}") from None
        if not isinstance(header, dict):
            raise _corrupt(path, "the header is not a JSON object")
        data_start, data_len = 8 + header_len, size - 8 - header_len
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, begin, end = _safetensors_layout(path, name, entry, data_len)
            f.seek(data_start + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)
            tensors[name] = _from_bytes(buffer, dtype, little_endian=True).reshape(shape)
    return tensors


def _has_json_header(path: pathlib.Path) -> bool:
    """Whether ``path`` starts with a safetensors header: a length, then that many bytes of a JSON object."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > path.stat().st_size - 8:
            return False
        try:
            return isinstance(json.loads(f.read(header_len)), dict)
        except ValueError:
            return False


def _corrupt(path: pathlib.Path, why: object) -> CheckpointError:
    return CheckpointError(f"truncated or corrupt checkpoint {path} ({why}): re-download it")


def _from_bytes(buffer: bytes | bytearray | memoryview, dtype: np.dtype, little_endian: bool) -> np.ndarray:
    """The 1-D array of ``dtype`` stored in ``buffer``, in native byte order."""
    array = np.frombuffer(buffer, dtype)
    if little_endian != (sys.byteorder == "little") and dtype.itemsize > 1:
        array = array.byteswap()
    return array


def _safetensors_layout(
    path: pathlib.Path, name: str, entry: Any, data_len: int
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """Validated ``(dtype, shape, begin, end)`` of one header entry; offsets are into the data."""
    try:
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: unsupported or malformed header entry for {name!r}: {entry!r}") from None
    if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)):
        raise CheckpointError(f"{path}: malformed header entry for {name!r}: {entry!r}")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{path}: header entry for {name!r} has a byte range that does not match its shape")
    if not begin <= end <= data_len:
        raise _corrupt(path, f"tensor {name!r} spans data bytes {begin}..{end} of {data_len}")
    return dtype, shape, begin, end


# --- the restricted unpickler -------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """Stands in for a ``torch.*Storage`` class in persistent ids."""

    dtype: np.dtype


def _rebuild_tensor_v2(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """The tensor ``t[i] = storage[storage_offset + sum(i * stride)]`` of shape ``size``, copied."""
    del requires_grad, backward_hooks, metadata
    size, stride = tuple(size), tuple(stride)
    layout = f"offset {storage_offset}, size {list(size)}, stride {list(stride)}"
    if len(size) != len(stride) or min((storage_offset, *size, *stride)) < 0:
        raise CheckpointError(f"invalid tensor layout ({layout})")
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    if storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
        raise CheckpointError(f"tensor ({layout}) reaches past its storage of {storage.size} elements")
    strides = [s * storage.itemsize for s in stride]
    return np.lib.stride_tricks.as_strided(storage[storage_offset:], size, strides).copy()


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
    """A ``Parameter`` is its data: requires_grad, hooks and state are dropped."""
    del unused
    return data


_REBUILD_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip archive, admitting only tensor state dict globals."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, little_endian: bool):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self._archive = archive
        self._prefix = prefix
        self._little_endian = little_endian
        self._records: dict[str, bytes] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[module, name]))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in _REBUILD_FUNCTIONS:
            # A fresh wrapper per lookup: the BUILD opcode can set attributes on any object
            # the pickle holds, and must not reach this module's functions.
            return functools.partial(_REBUILD_FUNCTIONS[module, name])
        raise CheckpointError(
            f"refusing pickle global {module}.{name}: only dicts of tensors can be read safely "
            "(re-save the checkpoint as model.state_dict())"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        match pid:
            case ("storage", _StorageType(dtype=dtype), str(key), _, int(numel)) if numel >= 0:
                pass
            case _:
                raise CheckpointError(f"unexpected persistent id {pid!r}")
        if key not in self._records:
            try:
                self._records[key] = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise _DamagedArchive(f"storage record data/{key} is missing") from None
        record = self._records[key]
        nbytes = numel * dtype.itemsize
        if len(record) < nbytes:
            raise _DamagedArchive(f"storage record data/{key} holds {len(record)} of {nbytes} bytes")
        return _from_bytes(memoryview(record)[:nbytes], dtype, self._little_endian)


def _unpickle(archive: zipfile.ZipFile) -> Any:
    """The object pickled in a torch zip archive, its tensors as numpy arrays."""
    pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
        raise CheckpointError(f"not a PyTorch checkpoint: expected one <name>/data.pkl record, found {pickles}")
    prefix = pickles[0].removesuffix("/data.pkl")
    # Older archives have no byteorder record; they were written little-endian.
    byteorder = "little"
    if f"{prefix}/byteorder" in archive.namelist():
        byteorder = archive.read(f"{prefix}/byteorder").decode(errors="replace")
    if byteorder not in ("little", "big"):
        raise _DamagedArchive(f"byteorder record is {byteorder!r}")
    unpickler = _StateDictUnpickler(archive, prefix, little_endian=byteorder == "little")
    try:
        return unpickler.load()
    except (CheckpointError, zipfile.BadZipFile, _DamagedArchive):
        raise
    except Exception as e:  # a damaged or crafted pickle can fail in many ways
        raise _DamagedArchive(f"unreadable data.pkl: {type(e).__name__}: {e}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    )


def _state_dict(obj: Any, path: pathlib.Path) -> dict[str, np.ndarray]:
    """``obj`` if it is a dict of tensors, else the only dict of tensors among its values."""
    if _is_state_dict(obj):
        return dict(obj)
    inner = [v for v in obj.values() if _is_state_dict(v)] if isinstance(obj, dict) else []
    if len(inner) == 1:
        return dict(inner[0])
    found = f"a dict with keys {list(obj)[:10]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise CheckpointError(
        f"{path}: expected a state dict of tensors or a dict wrapping exactly one, found {found}; "
        "re-save the checkpoint as model.state_dict()"
    )
