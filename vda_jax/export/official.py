"""Our models in the official key layout, as ``.safetensors`` or a ``torch.save``-style ``.pth``.

Each parameter is mapped back with ``convert.keymap`` (``official_key`` and
``inverse_value``), so converting an official checkpoint and exporting it gives the
same tensors bit for bit. Both formats are written without torch:

* safetensors: an 8-byte little-endian header length, the JSON header (dtype,
  shape, byte range per tensor) padded with spaces to 8 bytes, then the raw data;
* ``.pth``: the zip archive ``torch.save`` writes (``archive/data.pkl``, one
  ``archive/data/<i>`` record per storage, 64-byte aligned, ``byteorder``,
  ``version``), whose protocol-2 pickle is an ``OrderedDict`` of
  ``torch._utils._rebuild_tensor_v2`` calls on persistent storage ids. The
  pickle opcodes are written directly, as no torch classes exist to pickle.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
from flax import nnx

from vda_jax.convert.keymap import inverse_value, official_key
from vda_jax.models.vda import VideoDepthAnything

_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                       np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float64): "F64",
                       np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}
_TORCH_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                   np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.float64): "DoubleStorage",
                   np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage"}
_ARCHIVE = "archive"
_ALIGNMENT = 64  # torch aligns storage records so that they can be memory-mapped


def official_state_dict(model: VideoDepthAnything) -> dict[str, np.ndarray]:
    """Every variable of ``model`` under its official key, in the official layout (float32)."""
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        key, transform = official_key(".".join(map(str, path)))
        tensors[key] = np.ascontiguousarray(inverse_value(np.asarray(variable.get_value()), transform))
    return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` as a safetensors file (little-endian data, 8-byte aligned header)."""
    header, offset = {}, 0
    for name, value in tensors.items():
        dtype = _dtype_of(name, value, _SAFETENSORS_DTYPES)
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    if metadata:
        header = {"__metadata__": metadata, **header}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for value in tensors.values():
            f.write(_little_endian(value).tobytes())


def write_pth(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes ``tensors`` as ``torch.save(state_dict)`` would: a zip of a pickle and raw storages."""
    for name, value in tensors.items():
        _dtype_of(name, value, _TORCH_STORAGES)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        _write_record(archive, "data.pkl", _state_dict_pickle(tensors))
        _write_record(archive, "byteorder", b"little")
        for i, value in enumerate(tensors.values()):
            _write_record(archive, f"data/{i}", _little_endian(value).tobytes())
        _write_record(archive, "version", b"3\n")


def _dtype_of(name: str, value: np.ndarray, table: dict[np.dtype, str]) -> str:
    if value.dtype not in table:
        raise ValueError(f"tensor {name} has dtype {value.dtype}, which this format writer does not support")
    return table[value.dtype]


def _little_endian(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))


def _write_record(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    """Adds ``archive/<name>`` (stored), padding its local header so that the data starts 64-byte aligned."""
    info = zipfile.ZipInfo(f"{_ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    start = archive.fp.tell() + 30 + len(info.filename.encode())  # local header: 30 bytes + name
    padding = -(start + 4) % _ALIGNMENT  # + 4: the extra field's own id and length
    info.extra = struct.pack("<HH", 0x4246, padding) + b"Z" * padding  # "FB" id, as torch's writer
    archive.writestr(info, data)


def _state_dict_pickle(tensors: dict[str, np.ndarray]) -> bytes:
    """The protocol-2 pickle of an ``OrderedDict`` of tensors, storage ``i`` holding tensor ``i``."""
    out = io.BytesIO()
    write = out.write

    def text(s: str) -> None:
        data = s.encode()
        write(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

    def integer(i: int) -> None:
        write(pickle.BININT + struct.pack("<i", i) if -2**31 <= i < 2**31 else pickle.LONG1 + bytes(
            [len(pickle.encode_long(i))]) + pickle.encode_long(i))

    def ints(values: tuple[int, ...]) -> None:
        write(pickle.MARK)
        for v in values:
            integer(v)
        write(pickle.TUPLE)

    def global_(module: str, name: str) -> None:
        write(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def empty_ordered_dict() -> None:
        global_("collections", "OrderedDict")
        write(pickle.EMPTY_TUPLE + pickle.REDUCE)

    write(pickle.PROTO + bytes([2]))
    empty_ordered_dict()
    write(pickle.MARK)
    for i, (name, value) in enumerate(tensors.items()):
        text(name)
        global_("torch._utils", "_rebuild_tensor_v2")
        write(pickle.MARK)
        write(pickle.MARK)  # the persistent id: ('storage', storage type, key, location, numel)
        text("storage")
        global_("torch", _TORCH_STORAGES[value.dtype])
        text(str(i))
        text("cpu")
        integer(value.size)
        write(pickle.TUPLE + pickle.BINPERSID)
        integer(0)  # storage offset
        ints(value.shape)
        ints(tuple(s // value.itemsize for s in value.strides) if value.size else (1,) * value.ndim)
        write(pickle.NEWFALSE)  # requires_grad
        empty_ordered_dict()  # backward hooks
        write(pickle.TUPLE + pickle.REDUCE)
    write(pickle.SETITEMS + pickle.STOP)
    return out.getvalue()


def write_official(model: VideoDepthAnything, path: str) -> dict[str, np.ndarray]:
    """Writes ``model`` in the official layout; ``.pth`` or ``.safetensors`` by the file name."""
    tensors = official_state_dict(model)
    if path.endswith(".pth"):
        write_pth(path, tensors)
    elif path.endswith(".safetensors"):
        write_safetensors(path, tensors, {"format": "pt"})
    else:
        raise ValueError(f"{os.path.basename(path)}: official checkpoints end in .pth or .safetensors")
    return tensors

