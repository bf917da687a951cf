"""Video files in, depth files out: what ``vda-jax infer`` runs.

For each source ``<name>`` the outputs are ``<name>_src.mp4`` (the frames as
processed), ``<name>_vis.mp4`` (inferno depth, normalised over the whole video)
and, on request, ``<name>_depths.npz`` (key ``depths``), ``<name>_depths_exr/``
and, for metric models, ``<name>_ply/`` point clouds. ``<name>`` is a video's
file stem, a folder's name, or an image pattern's folder name. A video's outputs
are written into a hidden staging folder and moved into place together when it
is done (Ctrl-C waits for the move), so a video has all of its outputs or none,
and an interrupted run is resumed by running it again: finished videos are
skipped and the staging folders of interrupted ones are removed. The depth video
is encoded, and the outputs moved, in a background thread while the next videos run.

Several processes (``share``) split the sources round-robin, each writing its own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Generator, Iterator

import numpy as np
import tqdm

from vda_jax import interrupts
from vda_jax.inference.video import VideoJob, run_videos
from vda_jax.io import outputs
from vda_jax.io.paths import check_output_folder
from vda_jax.io.video import VideoInfo, VideoWriter, check_preset, encoded_shape, probe, read_frames, source_name
from vda_jax.models.vda import VideoDepthAnything
from vda_jax.runtime.model import ExportedModel


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How frames are read (the official ``run.py`` flags; <= 0 disables)."""

    max_res: int = 1280
    max_len: int = -1
    target_fps: float = -1


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    output_dir: str
    grayscale: bool = False
    save_npz: bool = False
    save_exr: bool = False
    save_ply: bool = False
    focal_length: tuple[float, float] = (470.4, 470.4)
    overwrite: bool = False
    video_preset: str = "veryfast"  # x264's speed for the mp4s (VideoWriter)


@dataclasses.dataclass
class Report:
    """What ``infer_files`` did with each of its sources."""

    written: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # outputs existed
    failed: list[str] = dataclasses.field(default_factory=list)  # each logged in one line


def check_options(options: OutputOptions) -> None:
    """Raises ValueError for options that cannot work, before any model is loaded."""
    if os.path.exists(options.output_dir) and not os.path.isdir(options.output_dir):
        raise ValueError(f"--output-dir {options.output_dir!r} is a file; name a folder (it is created if missing)")
    check_output_folder(options.output_dir, "--output-dir")
    check_preset(options.video_preset)
    if options.save_exr and not outputs.exr_available():
        raise ValueError(f"--save-exr needs the OpenEXR package: {outputs.EXR_INSTALL}")


def check_inputs(sources: list[str], *, batch_size: int, streaming: bool, exported: bool) -> None:
    """Raises ValueError for inputs and a runner that cannot go together, before any model is loaded
    (``exported``: the ONNX runtime's model)."""
    counts = collections.Counter(source_name(s) for s in sources)  # linear: jobs of thousands of videos
    duplicates = sorted(n for n, count in counts.items() if count > 1)
    if duplicates:
        raise ValueError(f"several inputs would write {duplicates[0]}_src.mp4; process them into different "
                         "--output-dir")
    if batch_size != 1 and (streaming or exported):
        runner = "streaming" if streaming else "the ONNX runtime"
        raise ValueError(f"--batch-size {batch_size}: {runner} runs one video at a time; drop --batch-size")


def output_paths(source: str, options: OutputOptions) -> dict[str, str]:
    """The files (and folders) written for ``source``."""
    base = os.path.join(options.output_dir, source_name(source))
    paths = {"src": f"{base}_src.mp4", "vis": f"{base}_vis.mp4"}
    if options.save_npz:
        paths["npz"] = f"{base}_depths.npz"
    if options.save_exr:
        paths["exr"] = f"{base}_depths_exr"
    if options.save_ply:
        paths["ply"] = f"{base}_ply"
    return paths


class _PlyWriter:
    """Per-frame point clouds, pairing each depth with its frame (frames arrive first)."""

    def __init__(self, directory: str, focal_length: tuple[float, float]):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.focal_length = directory, focal_length
        self.frames: collections.deque = collections.deque()
        self.count = 0

    def write(self, depth: np.ndarray) -> None:
        for d in depth:
            path = os.path.join(self.directory, f"frame_{self.count:05d}.ply")
            outputs.save_point_cloud_ply(path, d, self.frames.popleft(), *self.focal_length)
            self.count += 1

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class VideoOutputs:
    """The sink of one video: the processed source video and every requested depth output.

    Everything is written into a hidden staging folder beside the outputs; ``finish``
    moves it all into place, ``abort`` removes it. ``close`` finishes, or hands the
    sink to ``closer`` to finish it in the background.
    """

    def __init__(self, name: str, paths: dict[str, str], fps: float, options: OutputOptions, *,
                 closer: Callable[[VideoOutputs], None] | None = None):
        self.paths, self.closer = paths, closer
        self.committed = self.finished = False
        self.stage = os.path.join(options.output_dir, f".{name}_outputs.{uuid.uuid4().hex[:8]}.tmp")
        os.makedirs(self.stage)
        self.staged = {key: os.path.join(self.stage, os.path.basename(path)) for key, path in paths.items()}
        self.src = VideoWriter(self.staged["src"], fps, preset=options.video_preset)
        self.writers = [outputs.DepthVisWriter(self.staged["vis"], fps, grayscale=options.grayscale,
                                               preset=options.video_preset)]
        if "npz" in paths:
            self.writers.append(outputs.NpzDepthWriter(self.staged["npz"]))
        if "exr" in paths:
            self.writers.append(outputs.ExrDepthWriter(self.staged["exr"]))
        self.ply = _PlyWriter(self.staged["ply"], options.focal_length) if "ply" in paths else None
        if self.ply:
            self.writers.append(self.ply)
        self._tee: Generator[np.ndarray] | None = None

    def tee(self, frames: Generator[np.ndarray]) -> Iterator[np.ndarray]:
        """Passes frames through, encoding the source video (and keeping them for point clouds)."""
        self._tee = self._tee_frames(frames)
        return self._tee

    def _tee_frames(self, frames: Generator[np.ndarray]) -> Generator[np.ndarray]:
        with contextlib.closing(frames):  # stops the decoder when this is closed early
            for frame in frames:
                self.src.write(frame)
                if self.ply:
                    self.ply.frames.append(frame)
                yield frame

    def write(self, depth: np.ndarray) -> None:
        for writer in self.writers:
            writer.write(depth)

    def close(self) -> None:
        """Finishes now, or hands the sink to ``closer`` (which calls ``finish``)."""
        if self.closer:
            self.closer(self)
        else:
            self.finish()

    def finish(self) -> None:
        """Finishes every output (the depth video is encoded now) and moves them all into place."""
        self.src.close()
        for writer in self.writers:
            writer.close()
        with interrupts.held():
            for key, path in self.paths.items():
                if os.path.isdir(path):  # --overwrite of a frame folder: no stale frames past the new end
                    shutil.rmtree(path)
                os.replace(self.staged[key], path)
            self.committed = self.finished = True
            shutil.rmtree(self.stage, ignore_errors=True)

    def abort(self) -> None:
        """Stops decoding and encoding (the caller's decode thread has ended) and removes the staging folder."""
        if not self.finished:
            self.finished = True
            if self._tee is not None:
                self._tee.close()
            self.src.__exit__(RuntimeError, None, None)
            for writer in self.writers:
                writer.abort()
        shutil.rmtree(self.stage, ignore_errors=True)


class _Closer:
    """Finishes sinks in a background thread, so that the windows of the next videos run meanwhile.

    At most ``pending`` sinks wait or run; ``submit`` waits for the oldest beyond that.
    A sink that fails to finish goes to ``on_error(source, sink, error)``, in the caller's thread.
    """

    def __init__(self, on_error: Callable[[str, VideoOutputs, Exception], None], pending: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vda-jax-finish")
        self._queue: collections.deque[tuple[str, VideoOutputs, concurrent.futures.Future]] = collections.deque()
        self._on_error, self._pending = on_error, pending

    def submit(self, source: str, sink: VideoOutputs) -> None:
        while len(self._queue) >= self._pending:
            self._wait_oldest()
        with interrupts.held():  # the pool's thread starts here: Ctrl-C must not leave it running unknown
            self._queue.append((source, sink, self._pool.submit(sink.finish)))

    def wait(self) -> None:
        """Waits until every sink submitted is finished (or has failed)."""
        while self._queue:
            self._wait_oldest()

    def stop(self) -> None:
        """Drops the sinks not started and waits for the one being finished (which then completes)."""
        self._pool.shutdown(cancel_futures=True)

    def _wait_oldest(self) -> None:
        source, sink, future = self._queue[0]
        try:
            future.result()
        except (ValueError, OSError) as e:
            self._on_error(source, sink, e)
        finally:
            self._queue.popleft()


def _remove_stale(output_dir: str, name: str) -> None:
    """Removes the temporaries of ``name``'s outputs: this run's, or those an interrupted or killed one left."""
    stale = re.compile(rf"\.{re.escape(name)}_(outputs|src|vis|depths)\.[0-9a-f]{{8}}\.tmp(\.\w+)?")
    for entry in os.listdir(output_dir):
        if stale.fullmatch(entry):
            path = os.path.join(output_dir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def infer_files(model: VideoDepthAnything | ExportedModel, sources: list[str], options: OutputOptions,
                read: ReadOptions, *, input_size: int = 518, precision: str | None = None, batch_size: int = 1,
                streaming: bool = False, progress: bool = True, share: tuple[int, int] = (0, 1),
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                on_frames: Callable[[int], None] = lambda n: None) -> Report:
    """Writes depth outputs for this process's share of ``sources``.

    ``share = (index, count)``: process ``index`` of ``count`` takes every
    ``count``-th source from the ``index``-th, so processes that are given the same
    list write each output once. Outputs that exist are skipped unless
    ``options.overwrite``. An output folder that this call created and left empty
    is removed. ``on_frames(n)`` is called as each ``n`` depth frames are done.
    """
    check_inputs(sources, batch_size=batch_size, streaming=streaming, exported=isinstance(model, ExportedModel))
    if options.save_ply and not (model.metric if isinstance(model, ExportedModel) else model.config.metric):
        raise ValueError("point clouds need a metric model; drop --save-ply or use a metric checkpoint")
    if isinstance(model, ExportedModel):
        model.check_video_options(streaming=streaming, precision=precision)
    check_options(options)
    created = not os.path.isdir(options.output_dir)
    os.makedirs(options.output_dir, exist_ok=True)
    try:
        return _infer_share(model, sources[share[0]::share[1]], options, read, input_size=input_size,
                            precision=precision, batch_size=batch_size, streaming=streaming, progress=progress,
                            log=log, on_frames=on_frames)
    finally:
        with contextlib.suppress(OSError):  # not empty (or already gone): keep it
            if created:
                os.rmdir(options.output_dir)


def _above_bars(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` with the progress bars cleared before each message and drawn again after it, so a
    message starts a line of its own instead of following a bar."""

    def write(message: str) -> None:
        with tqdm.tqdm.external_write_mode(file=sys.stderr):
            log(message)

    return write


def _infer_share(model: VideoDepthAnything | ExportedModel, sources: list[str], options: OutputOptions,
                 read: ReadOptions, *, input_size: int, precision: str | None, batch_size: int, streaming: bool,
                 progress: bool, log: Callable[[str], None], on_frames: Callable[[int], None]) -> Report:
    report = Report()
    infos: dict[tuple[int, int], list[VideoInfo]] = collections.defaultdict(list)
    for source in sources:
        paths = output_paths(source, options)
        if not options.overwrite and all(os.path.exists(p) for p in paths.values()):
            log(f"{source}: outputs exist, skipping (pass --overwrite to redo)")
            report.skipped.append(source)
            continue
        _remove_stale(options.output_dir, source_name(source))
        try:
            info = probe(source).subsampled(max_res=read.max_res, max_len=read.max_len, target_fps=read.target_fps)
        except (ValueError, OSError) as e:
            log(f"{source}: error: {e}")
            report.failed.append(source)
            continue
        height, width = encoded_shape(info.height, info.width)
        if (height, width) != (info.height, info.width):
            log(f"{source}: the mp4s are padded to {width}x{height} (H.264 yuv420p has no odd sizes); "
                f"the depth files keep {info.width}x{info.height}")
        infos[(info.height, info.width)].append(info)

    total = sum(i.num_frames for group in infos.values() for i in group)
    bar = tqdm.tqdm(total=total, unit="frame", disable=not progress, dynamic_ncols=True, desc="depth")
    log = _above_bars(log)

    def done(count: int) -> None:
        bar.update(count)
        on_frames(count)

    sinks: dict[str, VideoOutputs] = {}

    def failed(source: str, sink: VideoOutputs, error: Exception) -> None:
        sink.abort()
        log(f"{source}: error: {error}")
        report.failed.append(source)

    closer = _Closer(failed)

    def jobs(group: list[VideoInfo]) -> Iterator[VideoJob]:
        for info in group:
            try:  # probes again: the file may have changed since
                frames = read_frames(info.path, max_res=read.max_res, max_len=read.max_len,
                                     target_fps=read.target_fps)
            except (ValueError, OSError) as e:
                log(f"{info.path}: error: {e}")
                report.failed.append(info.path)
                continue
            sink = VideoOutputs(source_name(info.path), output_paths(info.path, options), info.fps, options,
                                closer=functools.partial(closer.submit, info.path))
            sinks[info.path] = sink
            yield VideoJob(sink.tee(frames), sink, info.path)

    def on_error(job: VideoJob, error: Exception) -> None:
        failed(job.name, job.sink, error)

    try:
        for frame_size, group in infos.items():
            if streaming or isinstance(model, ExportedModel):  # onnxruntime runs one video at a time
                for job in jobs(group):
                    _stream_job(model, job, input_size, precision, done, on_error)
            else:
                run_videos(model, frame_size, jobs(group), input_size=input_size, precision=precision,
                           slots=min(batch_size, len(group)), on_frames=done, on_error=on_error)
        closer.wait()
    finally:
        closer.stop()  # before the aborts: a sink being finished completes first
        for sink in sinks.values():
            sink.abort()  # all but the committed ones: what an exception or Ctrl-C cut short
        for source in sources:  # and a sink cut short while it was being made
            _remove_stale(options.output_dir, source_name(source))
        bar.close()
    report.written = [source for source, sink in sinks.items() if sink.committed]
    return report


def _stream_job(model: VideoDepthAnything | ExportedModel, job: VideoJob, input_size: int, precision: str | None,
                on_frames: Callable[[int], None], on_error: Callable[[VideoJob, Exception], None]) -> None:
    """One video through the streaming mode, or through an exported model (``[n, H, W]`` chunks)."""
    from vda_jax.inference.stream import stream_depth

    if isinstance(model, ExportedModel):
        depths = model.depth(job.frames, input_size)
    else:
        depths = (d[None] for d in stream_depth(model, job.frames, input_size=input_size, precision=precision))
    try:
        for depth in depths:
            job.sink.write(depth)
            on_frames(len(depth))
    except (ValueError, OSError) as e:
        on_error(job, e)
        return
    job.sink.close()
