"""Frames in and out: lazy decoding of videos and image sequences, streaming mp4 encoding.

Decoding and encoding run in an ffmpeg subprocess, so memory stays constant in
the video's length: frames arrive one at a time over a pipe. Images are read
with imageio (its pillow plugin) and videos written with imageio's ffmpeg
plugin; videos are decoded one layer lower, by imageio-ffmpeg, which
lets us set the decoder's own filters (see ``_decode_video``).

Resizing for ``max_res`` is done by ffmpeg's ``scale`` filter (libswscale,
bicubic), inside the decoder process. This is the resize the official code gets
from decord, its default reader, which builds the same ``scale=W:H`` filter; it
also means full-resolution frames never cross the pipe. Image sequences have
no ffmpeg decoder in the loop and are resized with Pillow's bicubic filter,
which, like libswscale, widens its kernel when downscaling.

Videos are written as H.264 yuv420p, which every player reads but which has no
odd sizes: an odd-sized frame is padded by one black row or column at the
bottom or right (``encoded_shape``); depth files keep the exact size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import logging
import math
import os
import re
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence

import imageio.v2
import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
from PIL import Image

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
IMAGE_SEQUENCE_FPS = 30.0  # image files carry no frame rate

_PRINTF_FIELD = re.compile(r"%(0?)(\d*)d")
_GLOB_MAGIC = re.compile(r"[*?[]")


# ffmpeg runs in a subprocess, which forks and immediately execs in C; JAX warns about any
# fork once its threads run, though this one cannot deadlock.
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)


class VideoError(ValueError):
    """A video source that cannot be read, or that holds no frames."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a video source holds.

    Attributes:
      path: the source: a video file, an image folder or an image pattern.
      num_frames: frame count; for video files an estimate (duration * fps).
      fps: frames per second (``IMAGE_SEQUENCE_FPS`` for image sequences).
      height: frame height in pixels, after the container's rotation.
      width: frame width in pixels, after the container's rotation.
    """

    path: str
    num_frames: int
    fps: float
    height: int
    width: int

    def subsampled(self, *, max_res: int = -1, max_len: int = -1, target_fps: float = -1) -> VideoInfo:
        """The info of the frames ``read_frames`` yields with these options; ``fps`` is their true rate."""
        height, width = resized_shape(self.height, self.width, max_res)
        stride = frame_stride(self.fps, target_fps)
        num_frames = math.ceil(self.num_frames / stride)
        if max_len > 0:
            num_frames = min(num_frames, max_len)
        return VideoInfo(self.path, num_frames, self.fps / stride, height, width)


def resized_shape(height: int, width: int, max_res: int) -> tuple[int, int]:
    """``(height, width)`` with the longer side brought down to about ``max_res``, as the official reader does.

    Only a frame whose longer side exceeds ``max_res > 0`` is resized: both sides
    are scaled by ``max_res / max(height, width)``, rounded with Python's
    ``round`` (half to even) and an odd result is bumped up to the next even
    number, so the longer side can end one pixel above an odd ``max_res``.
    """
    if max_res <= 0 or max(height, width) <= max_res:
        return height, width
    scale = max_res / max(height, width)
    return _round_up_to_even(round(height * scale)), _round_up_to_even(round(width * scale))


def frame_stride(fps: float, target_fps: float) -> int:
    """Keep every ``frame_stride``-th frame to approach ``target_fps`` (``<= 0``: keep all)."""
    if target_fps <= 0:
        return 1
    return max(round(fps / target_fps), 1)


def natural_key(path: str) -> tuple[str | int, ...]:
    """Sort key ordering digit runs by value, so ``frame_2`` sorts before ``frame_10``."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", path)))


def probe(source: str) -> VideoInfo:
    """Reads a source's header (or its first image) without decoding frames.

    Args:
      source: a video file, a folder of png/jpg images, an image file, an image
        glob (``frames/*.png``) or an image printf pattern (``frames/%05d.png``).

    Raises:
      VideoError: the source is missing, unreadable or has no frames.
    """
    files = _image_files(source)
    if files is not None:
        height, width = _image_size(files[0])
        return VideoInfo(source, len(files), IMAGE_SEQUENCE_FPS, height, width)
    meta, frames = _start_ffmpeg(source)
    frames.close()
    if not meta["fps"]:
        raise VideoError(f"{source!r} declares no frame rate; re-encode it with a fixed one (ffmpeg -i IN -r 30 OUT).")
    width, height = meta["size"]
    return VideoInfo(source, round(meta["duration"] * meta["fps"]), meta["fps"], height, width)


def read_frames(source: str, *, max_res: int = -1, max_len: int = -1, target_fps: float = -1) -> Iterator[np.ndarray]:
    """Yields a source's frames one at a time, as uint8 RGB ``[H, W, 3]``.

    The options follow the official ``run.py`` flags. ``max_res``: see
    ``resized_shape``. ``target_fps``: keep frames ``0, s, 2s, ...`` with
    ``s = frame_stride(fps, target_fps)``; their rate is
    ``probe(source).subsampled(...).fps``. ``max_len``: stop after that many
    frames have been yielded (counted after the stride, as the official decord
    path does). Values ``<= 0`` disable an option.

    The source is probed when this is called, so a missing or unreadable one
    raises here; decoding starts at the first ``next``. Frames decoded by ffmpeg
    are read-only views of the pipe buffer.

    Raises:
      VideoError: the source is missing or unreadable, or yields no frame.
    """
    info = probe(source)
    shape = resized_shape(info.height, info.width, max_res)
    return _read_frames(info, shape, frame_stride(info.fps, target_fps), max_len)


def source_name(source: str) -> str:
    """The name of a source's outputs: a video file's stem, a folder's name, an image pattern's folder name."""
    path = os.path.normpath(source)
    if not os.path.exists(path) and (_PRINTF_FIELD.search(os.path.basename(path))
                                     or _GLOB_MAGIC.search(os.path.basename(path))):
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return os.path.basename(path) if os.path.isdir(path) else os.path.splitext(os.path.basename(path))[0]


def encoded_shape(height: int, width: int) -> tuple[int, int]:
    """The frame size ``VideoWriter`` stores for ``height x width`` frames: odd sides padded to even."""
    return _round_up_to_even(height), _round_up_to_even(width)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """The video sources named by paths, folders and patterns, naturally sorted, without duplicates.

    A file path is one source. A folder contributes its video files (known
    extensions, not recursing), and itself as one image sequence when it holds
    images. A glob contributes its matching video files and folders the same
    way, and itself as one image sequence when it matches images. A printf
    pattern (``frames/%05d.png``) is one image sequence.

    Raises:
      VideoError: an input names nothing, or a folder holds neither videos nor images.
    """
    sources = set()
    for item in inputs:
        if os.path.exists(item):
            sources.update(_expand_path(item))
        elif _PRINTF_FIELD.search(os.path.basename(item)):
            _image_files(item)  # raises when the pattern matches no image
            sources.add(item)
        elif _GLOB_MAGIC.search(item):
            matches = glob.glob(item)
            has_images = any(_is_image(m) for m in matches)
            nested = [m for m in matches if os.path.isdir(m) or _is_video(m)]
            if not has_images and not nested:
                raise VideoError(f"no video, image or folder matches {item!r}; check the pattern.")
            if has_images:
                sources.add(item)
            for match in nested:
                sources.update(_expand_path(match))
        else:
            raise VideoError(f"no such file or folder: {item!r}; check the path.")
    return sorted(sources, key=natural_key)


class AtomicPath:
    """A temporary path beside ``path`` (same extension) that replaces ``path`` on commit.

    As a context manager it yields the temporary path, commits when the block
    succeeds and discards otherwise. No file is created up front, so what gets
    written there has the usual permissions.
    """

    def __init__(self, path: str):
        directory, name = os.path.split(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"output folder {directory!r} does not exist; create it first.")
        stem, ext = os.path.splitext(name)
        self.path = path
        self.tmp = os.path.join(directory, f".{stem}.{uuid.uuid4().hex[:8]}.tmp{ext}")

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


def check_preset(preset: str) -> None:
    if preset not in X264_PRESETS:
        raise ValueError(f"unknown x264 preset {preset!r}; use one of {', '.join(X264_PRESETS)}")


class VideoWriter:
    """Encodes uint8 RGB frames to an H.264 mp4 (yuv420p) one at a time.

    Frames go to a temporary file beside ``path`` that is renamed into place by a
    clean ``close``; leaving a ``with`` block by an exception removes it. Odd
    frame sizes are padded by one black row or column at the bottom or right
    (``encoded_shape``), as yuv420p has no odd sizes.

    ``crf`` sets the quality and ``preset`` the x264 speed: "veryfast" encodes ~2.3x
    faster than x264's default "medium" (the official outputs' setting) at about the
    same size and quality at crf 18.

    Example:
      with VideoWriter("out.mp4", fps=30) as writer:
        for frame in frames:
          writer.write(frame)
    """

    def __init__(self, path: str, fps: float, *, crf: int = 18, preset: str = "veryfast"):
        check_preset(preset)
        self.path = path
        self.num_frames = 0
        self._fps = fps
        self._crf, self._preset = crf, preset
        self._shape = None
        self._encoder = None
        self._out = AtomicPath(path)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop_encoder()
            self._out.discard()

    def write(self, frames: np.ndarray) -> None:
        """Appends one frame ``[H, W, 3]`` or a batch ``[T, H, W, 3]``, uint8 RGB."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [H, W, 3] or [T, H, W, 3], got {frames.dtype} {frames.shape}.")
        if self._encoder is None:
            self._start_encoder(frames.shape[1:])
        if frames.shape[1:] != self._shape:
            raise ValueError(f"every frame must be {self._shape} like the first one, got {frames.shape[1:]}.")
        for frame in frames:
            self._encoder.append_data(frame)
        self.num_frames += len(frames)

    def close(self) -> None:
        """Finishes encoding and moves the video into place."""
        self._stop_encoder()
        if self.num_frames == 0:
            raise VideoError(f"no frames were written to {self.path!r}; write at least one frame before closing.")
        self._out.commit()

    def _start_encoder(self, shape: tuple[int, ...]) -> None:
        self._shape = shape
        height, width, _ = shape
        params = ["-crf", str(self._crf), "-preset", self._preset]
        if height % 2 or width % 2:
            params += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
        self._encoder = imageio.v2.get_writer(
            self._out.tmp, format="FFMPEG", fps=self._fps, codec="libx264", pixelformat="yuv420p", quality=None,
            macro_block_size=1, output_params=params)

    def _stop_encoder(self) -> None:
        if self._encoder is not None:
            self._encoder.close()  # waits for ffmpeg to flush and exit
            self._encoder = None


def _read_frames(info: VideoInfo, shape: tuple[int, int], stride: int, max_len: int) -> Iterator[np.ndarray]:
    files = _image_files(info.path)
    decoded = _decode_images(files, shape) if files is not None else _decode_video(info, shape)
    stop = (max_len - 1) * stride + 1 if max_len > 0 else None  # decode nothing past the last kept frame
    count = 0
    with contextlib.closing(decoded):
        for frame in itertools.islice(decoded, 0, stop, stride):
            yield frame
            count += 1
    if count == 0:
        raise VideoError(f"{info.path!r} holds no frames; check that the file is a complete video.")


def _decode_video(info: VideoInfo, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """All frames of a video file, resized in the decoder; raises when it ends well before its header's count."""
    height, width = shape
    _, frames = _start_ffmpeg(info.path, ["-vf", f"scale={width}:{height}:flags=bicubic"])
    count = 0
    with contextlib.closing(frames):
        for buffer in frames:
            yield np.frombuffer(buffer, np.uint8).reshape(height, width, 3)
            count += 1
    # The header's count is duration * fps, and the duration is the longest stream's (audio may run on).
    if count < info.num_frames - max(3, info.num_frames // 20):
        raise VideoError(
            f"{info.path!r} ends after {count} of the {info.num_frames} frames its header declares: the file is "
            f"truncated or damaged; download it again, or re-encode what it holds (ffmpeg -i IN OUT).")


def _decode_images(files: list[str], shape: tuple[int, int]) -> Iterator[np.ndarray]:
    source_shape = None
    for file in files:
        image = _read_image(file)
        source_shape = source_shape or image.shape
        if image.shape != source_shape:
            raise VideoError(
                f"{file!r} is {image.shape[1]}x{image.shape[0]} but the sequence's first image is "
                f"{source_shape[1]}x{source_shape[0]}; give all images of a sequence one size.")
        if image.shape[:2] != shape:
            image = np.asarray(Image.fromarray(image).resize(shape[::-1], Image.Resampling.BICUBIC))
        yield image


def _start_ffmpeg(path: str, output_params: Iterable[str] = ()) -> tuple[dict, Iterator[bytes]]:
    """Starts decoding to raw RGB; returns ffmpeg's header info and the frame generator.

    imageio-ffmpeg rather than imageio's ffmpeg plugin: the plugin sizes frames from
    the header or its own ``-s`` (so no ``scale`` filter with decord's flags) and
    does not pass every decoded frame through as it comes (``passthrough``).
    """
    if not os.path.isfile(path):
        raise VideoError(f"no such file: {path!r}; check the path.")
    # passthrough: one output frame per decoded frame, never duplicated or dropped to fake a constant rate.
    frames = imageio_ffmpeg.read_frames(path, output_params=["-fps_mode", "passthrough", *output_params])
    try:
        with _without_resize_warning():
            meta = next(frames)
    except OSError as e:
        frames.close()
        raise VideoError(
            f"ffmpeg finds no video frames to decode in {path!r}; check that it is a complete video file "
            f"(`ffmpeg -i {path}` shows what it holds).") from e
    return meta, frames


class _DropResizeWarning(logging.Filter):
    """imageio-ffmpeg warns whenever the output size differs from the source; here that is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is different from the source frame size" not in record.getMessage()


@contextlib.contextmanager
def _without_resize_warning() -> Iterator[None]:
    logger, drop = logging.getLogger("imageio_ffmpeg"), _DropResizeWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _image_files(source: str) -> list[str] | None:
    """The naturally sorted frames of an image-sequence source, or None when ``source`` is a video file."""
    if os.path.isdir(source):
        files = [os.path.join(source, name) for name in os.listdir(source) if _is_image(name)]
    elif os.path.isfile(source):
        if not _is_image(source):
            return None
        files = [source]
    elif match := _PRINTF_FIELD.search(os.path.basename(source)):
        directory, pattern = os.path.split(source)
        zero_pad, width = match.groups()
        digits = rf"\d{{{width},}}" if zero_pad else r"\d+"
        regex = re.compile(digits.join(re.escape(part) for part in _PRINTF_FIELD.split(pattern)[::3]))
        names = os.listdir(directory or ".") if os.path.isdir(directory or ".") else []
        files = [os.path.join(directory, name) for name in names if regex.fullmatch(name)]
    elif _GLOB_MAGIC.search(source):
        files = [path for path in glob.glob(source) if _is_image(path)]
    else:
        raise VideoError(f"no such file or folder: {source!r}; check the path.")
    if not files:
        kinds = "/".join(sorted(IMAGE_EXTENSIONS))
        raise VideoError(f"{source!r} holds no frames: no {kinds} image found; check the path.")
    return sorted(files, key=natural_key)


def _expand_path(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    names = os.listdir(path)
    sources = [os.path.join(path, name) for name in names if _is_video(name)]
    if any(_is_image(name) for name in names):
        sources.append(path)
    if not sources:
        raise VideoError(f"folder {path!r} holds neither videos nor images; check the path.")
    return sources


def _image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header."""
    try:
        return iio.improps(path, plugin="pillow").shape[:2]
    except OSError as e:
        raise VideoError(f"cannot read image {path!r} ({e}); replace or remove the file.") from e


def _read_image(path: str) -> np.ndarray:
    """An image file as uint8 RGB ``[H, W, 3]``."""
    try:
        return iio.imread(path, plugin="pillow", mode="RGB")
    except OSError as e:
        raise VideoError(f"cannot read image {path!r} ({e}); replace or remove the file.") from e


def _is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _round_up_to_even(n: int) -> int:
    return n + n % 2
