"""Opening an exported ONNX model (``MODEL.onnx`` + ``MODEL.onnx.json``) in onnxruntime."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator

import numpy as np

from vda_jax.inference import schedule
from vda_jax.inference.sizing import network_size
from vda_jax.runtime import video
from vda_jax.runtime.metadata import read_metadata


class ExportedModel:
    """An exported clip or streaming model: ``model(*inputs)`` runs it, inputs in the JSON's order."""

    def __init__(self, path: str, providers: list[str] | None = None):
        self.path = path
        self.meta = read_metadata(path, "onnx")
        try:
            import onnxruntime as ort  # here, so that importing this module needs no onnxruntime
        except ImportError as e:
            raise ValueError(f"running an ONNX model needs onnxruntime ({e}); install it with "
                             "pip install 'vda-jax[onnx]'") from e

        options = ort.SessionOptions()
        options.log_severity_level = 3  # no warnings about initializers the graph optimiser removes
        self.session = ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in self.meta["inputs"]]

    @property
    def streaming(self) -> bool:
        return self.meta["kind"] == "stream"

    @property
    def net_size(self) -> tuple[int, int]:
        return tuple(self.meta["network_size"])

    @property
    def metric(self) -> bool:
        return self.meta["depth"] == "metric"

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.input_names, inputs)))

    def check_video_options(self, *, streaming: bool = False, precision: str | None = None) -> None:
        """Refuses what the long-video runtime cannot do with this model, before any video is read.

        The model's kind and precision are fixed at export: ``--streaming`` needs a streaming
        export, ``--precision`` must be the exported one; a clip model must take 32-frame windows.
        """
        name = os.path.basename(self.path)
        if streaming and not self.streaming:
            raise ValueError(f"--streaming needs a streaming export, and {name} is a clip model; export one with "
                             "`vda-jax export CHECKPOINT OUT.onnx --streaming`, or drop --streaming")
        if precision is not None and precision != self.meta["precision"]:
            raise ValueError(f"--precision {precision}: {name} computes in {self.meta['precision']}, as exported; "
                             "drop --precision")
        frames = None if self.streaming else self.meta["window"]["frames"]
        if frames not in (None, schedule.WINDOW_FRAMES):
            raise ValueError(f"{name} takes clips of {frames} frames, but the long-video algorithm runs "
                             f"{schedule.WINDOW_FRAMES}-frame windows; export it again without --frames")

    def check_frame_size(self, frame_size: tuple[int, int], input_size: int | None = None) -> None:
        """Refuses frames whose official network size differs from the one the model was exported for."""
        input_size = input_size or self.meta["input_size"]
        want = network_size(frame_size, input_size)
        if want != self.net_size:
            raise ValueError(f"frames of {frame_size[0]}x{frame_size[1]} at input size {input_size} need a "
                             f"{want[0]}x{want[1]} network input, but the model was exported for "
                             f"{self.net_size[0]}x{self.net_size[1]}; export it with --height {want[0]} "
                             f"--width {want[1]}")

    def depth(self, frames: Iterable[np.ndarray], input_size: int | None = None) -> Iterator[np.ndarray]:
        """Depth of a video's uint8 RGB frames, ``[n, H, W]`` chunks in order (one frame each when streaming)."""
        self.check_video_options()
        iterator = iter(frames)
        first = next(iterator, None)
        if first is None:
            raise ValueError("the video has no frames")
        self.check_frame_size(np.shape(first)[:2], input_size)
        frames = itertools.chain([first], iterator)
        if self.streaming:
            ring = [np.zeros([int(d) for d in i["shape"]], i["dtype"]) for i in self.meta["inputs"][2:]]
            for depth in video.stream_depth(self, frames, self.net_size, ring):
                yield depth[None]
        else:
            yield from video.video_depth(lambda x: self(x)[0], frames, self.net_size, metric=self.metric)


def infer_video_depth(path: str, frames: Iterable[np.ndarray], input_size: int | None = None) -> np.ndarray:
    """Depth ``[N, H, W]`` of a whole video with the exported model at ``path``."""
    return np.concatenate(list(ExportedModel(path).depth(frames, input_size)))
