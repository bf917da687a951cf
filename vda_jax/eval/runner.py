"""Benchmark evaluation over a dataset split written by ``vda_jax.data.builders`` (``vda-jax eval``).

Videos are read frame by frame from the split's ArrayRecord data source, run through the
long-video inference (or another strategy of ``strategies``), and scored with the official
metrics under the protocol in the dataset's metadata:

* ``gt_crop`` (top, bottom, left, right): the part of the ground truth that is scored; the
  prediction is cropped alike when ``crop_prediction``, then resized to the cropped ground
  truth's size if they differ (OpenCV bilinear, as the official scripts);
* ``max_depth``: the depth cap (absent or None: no cap);
* ``eval_frames`` (start, stop): the frames scored; ``eval_videos``: only the first N videos.

TAE is computed where every scored frame has finite intrinsics and pose, otherwise it is
None (``-`` in the table, ``null`` in JSON). Only the current video's depths (and, for the
strategies other than "full", its frames) are held in memory. Metric models' depths are
inverted to disparity so that the same protocol applies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
import tqdm

from vda_jax.data.builders import open_split
from vda_jax.devices import Platform
from vda_jax.eval import metrics
from vda_jax.eval.strategies import infer_with_strategy
from vda_jax.io.video import AtomicPath
from vda_jax.models.vda import VideoDepthAnything, compute_model
from vda_jax.precision import default_precision


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a dataset is scored (see the module docstring); built from its metadata."""

    max_depth: float = math.inf
    gt_crop: metrics.Crop | None = None
    crop_prediction: bool = False
    eval_frames: tuple[int, int] | None = None
    eval_videos: int | None = None

    @classmethod
    def from_metadata(cls, metadata: dict) -> Protocol:
        kind = metadata.get("depth_kind", "metric")
        if kind != "metric":
            raise ValueError(f"the benchmark metrics need metric ground-truth depth, but this dataset holds {kind!r}")
        max_depth = _optional(metadata, "max_depth", float)
        return cls(
            max_depth=math.inf if max_depth is None else max_depth,
            gt_crop=_optional(metadata, "gt_crop", tuple),
            crop_prediction=bool(metadata.get("crop_prediction", False)),
            eval_frames=_optional(metadata, "eval_frames", tuple),
            eval_videos=_optional(metadata, "eval_videos", int),
        )


def _optional(metadata: dict, key: str, convert: Callable):
    return None if metadata.get(key) is None else convert(metadata[key])


@dataclasses.dataclass(frozen=True)
class VideoScore:
    """Metrics of one video; ``tae`` is None where the dataset has no cameras."""

    name: str
    frames: int
    abs_rel: float
    delta1: float
    rmse: float
    tae: float | None


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Per-video scores of a split, and their means (over the videos that have each metric)."""

    dataset: str
    split: str
    model: str
    strategy: str
    input_size: int
    precision: str
    max_frames: int | None
    videos: tuple[VideoScore, ...]

    @property
    def mean(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key in ("abs_rel", "delta1", "rmse", "tae"):
            values = [getattr(v, key) for v in self.videos if getattr(v, key) is not None]
            out[key] = float(np.mean(values)) if values else None
        return out

    def to_dict(self) -> dict:
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "videos"}
        return {**settings, "frames": sum(v.frames for v in self.videos), "mean": self.mean,
                "videos": [dataclasses.asdict(v) for v in self.videos]}


def _crop(x: np.ndarray, crop: metrics.Crop | None) -> np.ndarray:
    return x if crop is None else x[..., crop[0]:crop[1], crop[2]:crop[3]]


def _resize_linear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[T, h, w]`` -> ``[T, *size]``; half-pixel bilinear with clamped edges, as OpenCV ``INTER_LINEAR``."""
    return np.asarray(jax.image.resize(x.astype(np.float32), (len(x), *size), "linear", antialias=False))


def _disparity(depth: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(depth > 0, 1.0 / depth, 0.0).astype(np.float32)


def score_video(name: str, pred_disparity: np.ndarray, gt_depth: np.ndarray, intrinsics: np.ndarray,
                cam_to_world: np.ndarray, protocol: Protocol) -> VideoScore:
    """Scores one video under ``protocol``.

    Args:
      name: the video's name, for the report and error messages.
      pred_disparity: ``[T, h, w]`` relative disparity at the frames' resolution.
      gt_depth: ``[T, H, W]`` metric depth, 0 where missing.
      intrinsics: ``[T, 3, 3]``; cam_to_world: ``[T, 4, 4]``; NaN where unknown.
      protocol: the dataset's evaluation protocol.
    """
    frames = slice(*protocol.eval_frames) if protocol.eval_frames else slice(None)
    pred, gt = pred_disparity[frames], _crop(gt_depth[frames], protocol.gt_crop)
    intrinsics, cam_to_world = intrinsics[frames], cam_to_world[frames]
    if not len(gt):
        raise ValueError(f"{name}: none of its {len(gt_depth)} frames is in the scored range {protocol.eval_frames}")
    if protocol.crop_prediction:
        pred = _crop(pred, protocol.gt_crop)
    if pred.shape[1:] != gt.shape[1:]:
        pred = _resize_linear(pred, gt.shape[1:])
    try:
        scores = metrics.depth_metrics(pred, gt, max_depth=protocol.max_depth)
        tae = None
        if len(gt) >= 2 and np.isfinite(intrinsics).all() and np.isfinite(cam_to_world).all():
            tae = metrics.temporal_alignment_error(pred, gt, intrinsics, cam_to_world, max_depth=protocol.max_depth)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e
    return VideoScore(name, len(gt), scores["abs_rel"], scores["delta1"], scores["rmse"], tae)


class _VideoRecords:
    """One video's frames, read lazily from the data source; its depth and cameras kept on the way."""

    def __init__(self, source: Sequence[dict], video: int, first: int, count: int, on_frame: Callable[[int], None]):
        self.source, self.video, self.first, self.count, self.on_frame = source, video, first, count, on_frame
        self.depth: list[np.ndarray] = []
        self.K: list[np.ndarray] = []
        self.pose: list[np.ndarray] = []

    def frames(self) -> Iterator[np.ndarray]:
        for i in range(self.first, self.first + self.count):
            record = self.source[i]
            if record["video"] != self.video:
                raise ValueError(f"record {i} belongs to video {record['video']}, not {self.video}: the metadata's "
                                 "video table does not match the records (rebuild the dataset)")
            self.depth.append(record["depth"].astype(np.float32))
            self.K.append(record["K"])
            self.pose.append(record["pose"])
            self.on_frame(1)
            yield record["rgb"]


def evaluate(model: VideoDepthAnything, dataset: str, split: str = "test", *, data_dir: str | None = None,
             max_frames: int | None = None, input_size: int = 518, precision: str | None = None,
             strategy: str = "full", progress: bool = True) -> EvalReport:
    """Runs ``model`` over every video of a dataset split and scores it.

    Args:
      model: a loaded model.
      dataset: TFDS name, e.g. "vda_benchmark/kitti" or "vda_synthetic/small".
      split: the split to evaluate.
      data_dir: the TFDS data directory the dataset was built in.
      max_frames: infer and score only the first N frames of each video (None: all).
      input_size: network input short side.
      precision: "fp32", "tf32" or "bf16" (default: bf16 on accelerators, fp32 on CPU).
      strategy: a key of ``strategies.STRATEGIES``; "full" is the released method.
      progress: show a progress bar over frames.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    source, metadata = open_split(dataset, split, data_dir)
    protocol = Protocol.from_metadata(metadata)
    table = metadata.get("videos", {}).get(split)
    if table is None:
        raise ValueError(f"{dataset}:{split} holds single images (no video table in its metadata); evaluate videos")
    names = table["names"][:protocol.eval_videos]
    firsts = np.cumsum([0, *table["lengths"]])[:len(names)]
    counts = [min(n, max_frames or n) for n in table["lengths"][:len(names)]]
    precision = precision or default_precision(Platform.of())
    model = compute_model(model, precision)  # once, not per video

    scores = []
    with tqdm.tqdm(total=sum(counts), unit="frame", disable=not progress, desc=f"eval {dataset}:{split}",
                   dynamic_ncols=True) as bar:
        for v, (name, first, count) in enumerate(zip(names, firsts, counts)):
            video = _VideoRecords(source, v, int(first), count, bar.update)
            pred = infer_with_strategy(model, video.frames(), strategy, input_size=input_size, precision=precision)
            if model.config.metric:
                pred = _disparity(pred)
            scores.append(score_video(name, pred, np.stack(video.depth), np.stack(video.K), np.stack(video.pose),
                                      protocol))
    return EvalReport(dataset, split, model.config.name, strategy, input_size, precision, max_frames, tuple(scores))


def _row(name: str, frames: int, scores: dict[str, float | None]) -> list[str]:
    digits = {"abs_rel": 4, "delta1": 4, "rmse": 4, "tae": 3}
    return [name, str(frames)] + ["-" if scores[k] is None else f"{scores[k]:.{d}f}" for k, d in digits.items()]


def format_table(report: EvalReport) -> str:
    """A plain aligned table: one row per video and a mean row."""
    rows = [["video", "frames", "AbsRel", "delta1", "RMSE", "TAE"]]
    rows += [_row(v.name, v.frames, dataclasses.asdict(v)) for v in report.videos]
    rows.append(_row("mean", sum(v.frames for v in report.videos), report.mean))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) for r in rows]
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(report: EvalReport, path: str) -> None:
    """Writes ``report.to_dict()`` to ``path`` atomically (its folder is created if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with AtomicPath(path) as tmp, open(tmp, "w") as f:
        json.dump(report.to_dict(), f, indent=2)
        f.write("\n")
