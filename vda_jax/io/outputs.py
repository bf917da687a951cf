"""Depth out: colour-mapped video, npz, EXR frames and PLY point clouds.

Every writer takes frames as they are produced (one ``[H, W]`` or a batch
``[T, H, W]`` per ``write``) and keeps RAM constant in the video's length:
frames that are needed again at the end are spooled to an anonymous temporary
file beside the output, which the OS removes even if the process dies. Outputs
appear atomically: a temporary file renamed into place on a clean ``close``.
Used as context managers, the writers close on success and leave nothing behind
on an exception.
"""

from __future__ import annotations

import abc
import importlib.util
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Self

import numpy as np

from vda_jax.io._inferno import INFERNO
from vda_jax.io.video import AtomicPath, VideoWriter, check_preset

EXR_INSTALL = 'pip install -e ".[exr]"'  # the README's command, run in the vda-jax folder
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_ENCODE_CHUNK = 4  # frames coloured at once when encoding the visualisation


def colorize(depth: np.ndarray, vmin: float, vmax: float, *, grayscale: bool = False) -> np.ndarray:
    """Depth ``[..., H, W]`` to uint8 RGB ``[..., H, W, 3]`` through the inferno colour map.

    Values are mapped linearly from ``[vmin, vmax]`` to the 256 colour-map entries
    (truncating, in float32, as the official visualisation does); values outside
    the range take the end colours, and a degenerate range gives the first one.
    With ``grayscale`` the three channels hold the entry index.
    """
    depth = np.asarray(depth, np.float32)
    vmin, vmax = np.float32(vmin), np.float32(vmax)
    span = vmax - vmin if vmax > vmin else np.float32(np.inf)
    index = np.clip(np.nan_to_num((depth - vmin) / span * 255), 0, 255).astype(np.uint8)
    if grayscale:
        return np.repeat(index[..., None], 3, axis=-1)
    return INFERNO[index]


def save_point_cloud_ply(path: str, depth: np.ndarray, rgb: np.ndarray, fx: float, fy: float) -> None:
    """Writes one frame's back-projected pixels as a binary PLY point cloud, atomically.

    Pixel ``(u, v)`` with depth ``z`` becomes ``((u - W/2) z / fx, (v - H/2) z / fy, z)``:
    a pinhole camera looking down +z with its principal point at the image
    centre, x right and y down, as the official metric export does. One vertex
    per pixel in row-major order, float32 xyz and uint8 rgb.

    Args:
      path: the .ply file to write.
      depth: metric depth ``[H, W]``.
      rgb: the frame, uint8 ``[H, W, 3]``.
      fx: focal length along x, in pixels.
      fy: focal length along y, in pixels.
    """
    depth = np.asarray(depth, np.float32)
    rgb = np.asarray(rgb)
    if depth.ndim != 2 or rgb.shape != (*depth.shape, 3) or rgb.dtype != np.uint8:
        raise ValueError(
            f"need depth [H, W] and uint8 rgb [H, W, 3], got depth {depth.shape} and rgb {rgb.dtype} {rgb.shape}.")
    height, width = depth.shape
    u, v = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    vertices = np.empty(height * width, [(c, "<f4") for c in "xyz"] + [(c, "u1") for c in ("red", "green", "blue")])
    vertices["x"] = ((u - width / 2) / fx * depth).ravel()
    vertices["y"] = ((v - height / 2) / fy * depth).ravel()
    vertices["z"] = depth.ravel()
    for i, channel in enumerate(("red", "green", "blue")):
        vertices[channel] = rgb[..., i].ravel()
    header = "\n".join([
        "ply", "format binary_little_endian 1.0", f"element vertex {len(vertices)}",
        *(f"property float {c}" for c in "xyz"), *(f"property uchar {c}" for c in ("red", "green", "blue")),
        "end_header", ""])
    with AtomicPath(path) as tmp, open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        vertices.tofile(f)


class _DepthWriter(abc.ABC):
    """Context-manager protocol of the writers: ``close`` on success, ``abort`` on an exception."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @abc.abstractmethod
    def close(self) -> None:
        """Finishes the output and moves it into place."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drops everything not yet in place."""


class _Spool:
    """Depth frames appended to an anonymous temporary file in ``directory``, read back in chunks."""

    def __init__(self, directory: str, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.frame_shape = None
        self.num_frames = 0
        self.file = tempfile.TemporaryFile(dir=directory)

    def append(self, frames: np.ndarray) -> None:
        if self.frame_shape is None:
            self.frame_shape = frames.shape[1:]
        elif frames.shape[1:] != self.frame_shape:
            raise ValueError(f"every depth frame must be {self.frame_shape} as the first, got {frames.shape[1:]}.")
        self.file.write(frames.astype(self.dtype).tobytes())
        self.num_frames += len(frames)

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """All frames so far, ``[size, H, W]`` at a time (the last chunk may be shorter).

        Plain reads rather than a memmap, so the pages read stay out of the
        process's resident memory.
        """
        self.file.seek(0)
        for start in range(0, self.num_frames, size):
            count = min(size, self.num_frames - start)
            data = self.file.read(count * math.prod(self.frame_shape) * self.dtype.itemsize)
            yield np.frombuffer(data, self.dtype).reshape(count, *self.frame_shape)

    def close(self) -> None:
        self.file.close()


class DepthVisWriter(_DepthWriter):
    """Writes the inferno-coloured depth video, normalised by the whole video's min and max.

    The official visualisation needs the global range before the first frame
    is coloured. Here frames are spooled to disk as float16 while the running
    range is tracked; ``close`` colours the spooled frames and encodes the mp4.
    Temporary disk use is ``2 * N * H * W`` bytes.
    """

    def __init__(self, path: str, fps: float, *, grayscale: bool = False, crf: int = 18, preset: str = "veryfast"):
        check_preset(preset)
        self.path = path
        self.vmin, self.vmax = np.inf, -np.inf
        self._fps, self._grayscale, self._crf, self._preset = fps, grayscale, crf, preset
        self._spool = _Spool(os.path.dirname(os.path.abspath(path)), np.float16)

    def write(self, depth: np.ndarray) -> None:
        """Appends depth ``[H, W]`` or ``[T, H, W]``."""
        depth = _depth_frames(depth)
        self.vmin = min(self.vmin, float(depth.min()))
        self.vmax = max(self.vmax, float(depth.max()))
        self._spool.append(np.clip(depth, -_FLOAT16_MAX, _FLOAT16_MAX))

    def close(self) -> None:
        """Encodes the spooled frames, a chunk at a time, and moves the video into place."""
        try:
            if self._spool.num_frames == 0:
                raise ValueError(f"no depth frames were written for {self.path!r}; write at least one before closing.")
            with VideoWriter(self.path, self._fps, crf=self._crf, preset=self._preset) as video:
                for chunk in self._spool.chunks(_ENCODE_CHUNK):
                    video.write(colorize(chunk, self.vmin, self.vmax, grayscale=self._grayscale))
        finally:
            self._spool.close()

    def abort(self) -> None:
        self._spool.close()


class NpzDepthWriter(_DepthWriter):
    """Writes depth ``[N, H, W]`` float32 into an .npz, read back by ``np.load(path)["depths"]`` (the official key).

    Frames are spooled to disk; ``close`` stores them uncompressed as the
    archive's ``depth.npy``, writing the .npy header for the final shape and
    then copying the spooled bytes in chunks.
    """

    def __init__(self, path: str):
        self.path = path
        self._spool = _Spool(os.path.dirname(os.path.abspath(path)), np.float32)

    def write(self, depth: np.ndarray) -> None:
        """Appends depth ``[H, W]`` or ``[T, H, W]``."""
        self._spool.append(_depth_frames(depth))

    def close(self) -> None:
        """Writes the archive and moves it into place."""
        spool = self._spool
        try:
            if spool.num_frames == 0:
                raise ValueError(f"no depth frames were written for {self.path!r}; write at least one before closing.")
            header = {"descr": np.lib.format.dtype_to_descr(spool.dtype), "fortran_order": False,
                      "shape": (spool.num_frames, *spool.frame_shape)}
            spool.file.seek(0)
            with (AtomicPath(self.path) as tmp,
                  zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
                  archive.open("depths.npy", "w", force_zip64=True) as member):
                np.lib.format.write_array_header_1_0(member, header)
                shutil.copyfileobj(spool.file, member, 1 << 24)
        finally:
            spool.close()

    def abort(self) -> None:
        self._spool.close()


class ExrDepthWriter(_DepthWriter):
    """Writes each depth frame as a float32 single-channel ("Z") EXR, ``directory/frame_00000.exr`` on.

    The file names are the official ones.

    Each frame file appears atomically as it is written, so ``close`` and
    ``abort`` have nothing left to do; they exist to share the writers' interface.
    Needs the optional OpenEXR package (``EXR_INSTALL``).
    """

    def __init__(self, directory: str):
        if not exr_available():
            raise ModuleNotFoundError(f"writing EXR needs the OpenEXR package: {EXR_INSTALL}")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.num_frames = 0

    def write(self, depth: np.ndarray) -> None:
        """Writes depth ``[H, W]`` or ``[T, H, W]``, one file per frame."""
        import OpenEXR  # optional dependency, checked in __init__

        header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
        for frame in _depth_frames(depth):
            path = os.path.join(self.directory, f"frame_{self.num_frames:05d}.exr")
            with AtomicPath(path) as tmp, OpenEXR.File(header, {"Z": np.ascontiguousarray(frame)}) as exr:
                exr.write(tmp)
            self.num_frames += 1

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def exr_available() -> bool:
    """Whether the optional OpenEXR package is installed."""
    return importlib.util.find_spec("OpenEXR") is not None


def _depth_frames(depth: np.ndarray) -> np.ndarray:
    """``[H, W]`` or ``[T, H, W]`` depth as float32 ``[T, H, W]``."""
    depth = np.asarray(depth, np.float32)
    if depth.ndim == 2:
        return depth[None]
    if depth.ndim != 3:
        raise ValueError(f"depth must be [H, W] or [T, H, W], got shape {depth.shape}.")
    return depth
