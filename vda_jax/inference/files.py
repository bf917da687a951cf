"""Video files in, depth files out: what ``vda-jax infer`` runs.

For each source ``<name>`` the outputs are ``<name>_src.mp4`` (the frames as
processed), ``<name>_vis.mp4`` (inferno depth, normalised over the whole video)
and, on request, ``<name>_depths.npz`` (key ``depths``), ``<name>_depths_exr/``
and, for metric models, ``<name>_ply/`` point clouds. Every file appears
atomically when its video is done, so an interrupted run is resumed by running
it again: finished videos are skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tqdm

from vda_jax.inference.video import VideoJob, run_videos
from vda_jax.io import outputs
from vda_jax.io.video import VideoInfo, VideoWriter, probe, read_frames
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


def output_paths(source: str, options: OutputOptions) -> dict[str, str]:
    """The files (and folders) written for ``source``."""
    name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    base = os.path.join(options.output_dir, name)
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
    """The sink of one video: the processed source video and every requested depth output."""

    def __init__(self, paths: dict[str, str], fps: float, options: OutputOptions):
        self.paths = paths
        self.finished = False
        self.src = VideoWriter(paths["src"], fps)
        self.writers = [outputs.DepthVisWriter(paths["vis"], fps, grayscale=options.grayscale)]
        if "npz" in paths:
            self.writers.append(outputs.NpzDepthWriter(paths["npz"]))
        if "exr" in paths:
            self.writers.append(outputs.ExrDepthWriter(paths["exr"]))
        self.ply = _PlyWriter(paths["ply"], options.focal_length) if "ply" in paths else None
        if self.ply:
            self.writers.append(self.ply)

    def tee(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Passes frames through, encoding the source video (and keeping them for point clouds)."""
        for frame in frames:
            self.src.write(frame)
            if self.ply:
                self.ply.frames.append(frame)
            yield frame

    def write(self, depth: np.ndarray) -> None:
        for writer in self.writers:
            writer.write(depth)

    def close(self) -> None:
        self.src.close()
        for writer in self.writers:
            writer.close()
        self.finished = True

    def abort(self) -> None:
        if not self.finished:
            self.src.__exit__(RuntimeError, None, None)
            for writer in self.writers:
                writer.abort()
            self.finished = True


def infer_files(model: VideoDepthAnything | ExportedModel, sources: list[str], options: OutputOptions,
                read: ReadOptions, *, input_size: int = 518, precision: str | None = None, batch_size: int = 1,
                streaming: bool = False, progress: bool = True,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[str]:
    """Writes depth outputs for every source; returns the sources that failed (each logged in one line)."""
    names = [os.path.basename(output_paths(s, options)["src"]) for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several inputs would write {duplicates[0]}; process them into different --output-dir")
    exported = isinstance(model, ExportedModel)  # runs in onnxruntime, one video at a time
    if options.save_ply and not (model.metric if exported else model.config.metric):
        raise ValueError("point clouds need a metric model; drop --save-ply or use a metric checkpoint")
    os.makedirs(options.output_dir, exist_ok=True)
    failed: list[str] = []
    infos: dict[tuple[int, int], list[VideoInfo]] = collections.defaultdict(list)
    for source in sources:
        paths = output_paths(source, options)
        if not options.overwrite and all(os.path.exists(p) for p in paths.values()):
            log(f"{source}: outputs exist, skipping (pass --overwrite to redo)")
            continue
        try:
            info = probe(source).subsampled(max_res=read.max_res, max_len=read.max_len, target_fps=read.target_fps)
        except (ValueError, OSError) as e:
            log(f"{source}: error: {e}")
            failed.append(source)
            continue
        infos[(info.height, info.width)].append(info)

    total = sum(i.num_frames for group in infos.values() for i in group)
    bar = tqdm.tqdm(total=total, unit="frame", disable=not progress, dynamic_ncols=True, desc="depth")
    sinks: dict[str, VideoOutputs] = {}

    def jobs(group: list[VideoInfo]) -> Iterator[VideoJob]:
        for info in group:
            sink = VideoOutputs(output_paths(info.path, options), info.fps, options)
            sinks[info.path] = sink
            frames = read_frames(info.path, max_res=read.max_res, max_len=read.max_len, target_fps=read.target_fps)
            yield VideoJob(sink.tee(frames), sink, info.path)

    def on_error(job: VideoJob, error: Exception) -> None:
        job.sink.abort()
        log(f"{job.name}: error: {error}")
        failed.append(job.name)

    try:
        for frame_size, group in infos.items():
            if streaming or exported:
                for job in jobs(group):
                    _stream_job(model, job, input_size, precision, bar.update, on_error)
            else:
                run_videos(model, frame_size, jobs(group), input_size=input_size, precision=precision,
                           slots=min(batch_size, len(group)), on_frames=bar.update, on_error=on_error)
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    finally:
        bar.close()
    return failed


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
