"""TFDS builders of RGB-D video datasets, written as ArrayRecord without TensorFlow.

Storage: one record per frame, in video order (shuffling disabled): the frame as PNG/JPEG
bytes, the depth as a raw float array. Per-frame records give the best clip throughput:
ArrayRecord reads any record in O(1), so a clip of T frames at any stride costs exactly T reads
and T decodes whatever the video's length, and the clip length, stride and overlap stay choices
of the input pipeline. A record per video would decode a whole video to use T of its frames; a
record per clip would fix T and the stride at build time and store the frames of overlapping
clips several times. Frames stay encoded (lossless PNG is about 3x smaller than raw; source
JPEGs are kept byte for byte); their decode is the main cost of reading (a few ms for 300x400
on one core), spread over the pipeline's threads. Depth stays raw float (float16 for training
sets, float32 where evaluation must be exact): decoding it is a copy.

Metadata (``builder.info.metadata``) tells the pipeline and evaluation how to read a split:
  videos: {split: {"names": [...], "lengths": [...]}}: records are the frames of these
    videos back to back (absent for single images, where each record stands alone);
  depth_kind: "metric" (z-depth in metres) or "disparity" (affine-invariant inverse depth);
  max_depth: depths at or beyond it are invalid (None: no cap);
and for the official benchmark its evaluation protocol (see ``layouts.Benchmark``).

Features of a record: ``video``, ``frame`` (int32 indices), ``rgb`` [H, W, 3] uint8,
``depth`` [H', W'] float (0 = invalid), ``K`` [3, 3] and ``pose`` [4, 4] float32
(camera-to-world, OpenCV axes; NaN where the source has none); the synthetic set adds
``dynamic`` [H, W] bool.

Build with ``prepare(...)``; read with ``open_split(name, split, data_dir)``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from vda_jax import logs
from vda_jax.data import files, layouts, synthetic
from vda_jax.io.paths import check_output_folder

# TFDS recommends OpenCV for decoding PNGs (PIL decodes ours as well), announces every
# BuilderConfig that is not predefined (the synthetic configs of a training run are made to measure),
# and warns of a data folder that does not hold the dataset, which ``open_split`` says as its error.
logs.drop("absl", "OpenCV is not installed.", "Using custom data configuration:", "has no dataset_info.json")

_NO_K = np.full((3, 3), np.nan, np.float32)
_NO_POSE = np.full((4, 4), np.nan, np.float32)


def frame_features(depth_dtype: type, dynamic: bool = False) -> tfds.features.FeaturesDict:
    """The record layout shared by every builder."""
    features = {
        "video": tfds.features.Scalar(np.int32, doc="index into metadata['videos'][split]"),
        "frame": tfds.features.Scalar(np.int32, doc="index of the frame in its video"),
        "rgb": tfds.features.Image(shape=(None, None, 3), doc="RGB frame (encoded bytes)"),
        "depth": tfds.features.Tensor(
            shape=(None, None), dtype=depth_dtype, encoding=tfds.features.Encoding.BYTES, doc="depth, 0 where invalid"
        ),
        "K": tfds.features.Tensor(shape=(3, 3), dtype=np.float32, doc="intrinsics; NaN if unknown"),
        "pose": tfds.features.Tensor(shape=(4, 4), dtype=np.float32, doc="camera-to-world; NaN if unknown"),
    }
    if dynamic:
        features["dynamic"] = tfds.features.Tensor(
            shape=(None, None), dtype=np.bool_, encoding=tfds.features.Encoding.ZLIB, doc="pixels on moving objects"
        )
    return tfds.features.FeaturesDict(features)


def _video_table(videos: list[layouts.Video]) -> dict[str, list]:
    return {"names": [v.name for v in videos], "lengths": [len(v.rgb) for v in videos]}


# ----------------------------------------------------------------------------- synthetic


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """Size of a synthetic dataset.

    Attributes:
      height, width, num_frames: of every video.
      num_videos: videos in the (train, validation, test) splits; 0 leaves a split out.
      seed: the dataset seed; video i of split s is rendered from a seed derived from (seed, s, i).
      scene_kind: "room", "outdoor", or None for a mix.
    """

    height: int = 128
    width: int = 160
    num_frames: int = 48
    num_videos: tuple[int, int, int] = (200, 20, 20)
    seed: int = 0
    scene_kind: str | None = None


def video_seed(seed: int, split: str, index: int) -> int:
    """The render seed of video ``index`` of ``split`` in a dataset with seed ``seed``."""
    return int(np.random.SeedSequence([seed, layouts.SPLITS.index(split), index]).generate_state(1)[0])


def _bounded_map(fn: Callable, items: list, workers: int) -> Iterator:
    """``map(fn, items)`` in order over ``workers`` processes, holding at most 2 * workers results."""
    if workers <= 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once JAX threads exist
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class VdaSynthetic(tfds.core.GeneratorBasedBuilder):
    """Procedurally rendered rooms and streets with exact depth, cameras and motion masks."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        SyntheticConfig(name="small", description="128x160, 48 frames, 200/20/20 videos"),
        SyntheticConfig(
            name="base",
            height=294,
            width=392,
            num_frames=64,
            num_videos=(500, 25, 25),
            description="294x392, 64 frames, 500/25/25 videos",
        ),
    ]

    def __init__(self, *, workers: int = 1, **kwargs):
        """``workers`` processes render videos in parallel; the output does not depend on it."""
        super().__init__(**kwargs)
        self._workers = workers

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=frame_features(np.float16, dynamic=True),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        sizes = {s: n for s, n in zip(layouts.SPLITS, c.num_videos) if n}
        self.info.metadata.update(
            depth_kind="metric",
            max_depth=None,
            videos={
                s: {"names": [f"{s}_{i:05d}" for i in range(n)], "lengths": [c.num_frames] * n}
                for s, n in sizes.items()
            },
        )
        return {s: self._generate_examples(s, n) for s, n in sizes.items()}

    def _generate_examples(self, split: str, num_videos: int):
        c = self.builder_config
        render = functools.partial(
            synthetic.render_video, num_frames=c.num_frames, height=c.height, width=c.width, scene_kind=c.scene_kind
        )
        seeds = [video_seed(c.seed, split, i) for i in range(num_videos)]
        for v, video in enumerate(_bounded_map(render, seeds, self._workers)):
            for f in range(c.num_frames):
                yield v * c.num_frames + f, {
                    "video": v,
                    "frame": f,
                    "rgb": files.encode_png(video["frames"][f]),
                    "depth": video["depth"][f].astype(np.float16),
                    "K": video["K"][f],
                    "pose": video["pose"][f],
                    "dynamic": video["dynamic"][f],
                }


# ----------------------------------------------------------------------------- folders


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Datasets read from a source folder, passed to TFDS as its ``manual_dir``."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the source folder as prepare(..., source_dir=FOLDER)."
    DEPTH_DTYPE: type = np.float32

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=frame_features(self.DEPTH_DTYPE),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _generate_examples(self, videos: list[layouts.Video], depth_scale: float, same_size: bool):
        """Records of the frames of ``videos``, keyed by their position in the split."""
        key = 0
        for v, video in enumerate(videos):
            for f, (rgb_path, depth_path) in enumerate(zip(video.rgb, video.depth)):
                rgb, size = files.read_rgb(rgb_path)
                depth = files.read_depth(depth_path, depth_scale)
                if same_size and depth.shape != size:
                    raise ValueError(
                        f"frame {rgb_path} is {size[0]}x{size[1]} but its depth {depth_path} is "
                        f"{depth.shape[0]}x{depth.shape[1]}; they must match"
                    )
                stored = depth.astype(self.DEPTH_DTYPE)
                if not np.isfinite(stored).all():
                    raise ValueError(f"depth {depth_path} exceeds the range of {np.dtype(self.DEPTH_DTYPE).name}")
                yield key, {
                    "video": v,
                    "frame": f,
                    "rgb": rgb,
                    "depth": stored,
                    "K": _NO_K if video.K is None else video.K[f].astype(np.float32),
                    "pose": _NO_POSE if video.pose is None else video.pose[f].astype(np.float32),
                }
                key += 1


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    """How to read a generic video folder.

    Attributes:
      depth_scale: stored depth value / depth_scale = metres (e.g. 1000 for millimetre PNGs).
      max_depth: depths at or beyond it are invalid; None for no cap.
      depth_kind: "metric" or "disparity".
    """

    depth_scale: float = 1.0
    max_depth: float | None = None
    depth_kind: str = "metric"


class VdaVideoFolder(_FolderBuilder):
    """Videos in the generic folder layout (see ``layouts``): one folder per video."""

    BUILDER_CONFIGS = [FolderConfig(name="default")]

    def _split_generators(self, dl_manager):
        c = self.builder_config
        videos = {
            s: layouts.folder_videos(folder)
            for s, folder in layouts.split_folders(os.fspath(dl_manager.manual_dir)).items()
        }
        self.info.metadata.update(
            depth_kind=c.depth_kind, max_depth=c.max_depth, videos={s: _video_table(v) for s, v in videos.items()}
        )
        return {s: self._generate_examples(v, c.depth_scale, same_size=True) for s, v in videos.items()}


@dataclasses.dataclass
class BenchmarkConfig(tfds.core.BuilderConfig):
    """One dataset of the official benchmark; ``layout`` says how it is stored and evaluated."""

    layout: layouts.Benchmark | None = None


class VdaBenchmark(_FolderBuilder):
    """The official evaluation sets (a ``test`` split) from its extraction scripts' output.

    The source folder is the extraction's ``<saved_dir>/<dataset>`` (e.g. ``.../datasets/kitti``).
    Frames and depth are stored as extracted, so sizes may differ (NYUv2, ScanNet): evaluation
    crops the depth with ``gt_crop``, resizes the prediction to it, and caps at ``max_depth``.
    """

    BUILDER_CONFIGS = [BenchmarkConfig(name=name, layout=layout) for name, layout in layouts.BENCHMARKS.items()]

    def _split_generators(self, dl_manager):
        layout = self.builder_config.layout
        videos = layouts.benchmark_videos(os.fspath(dl_manager.manual_dir), layout)
        protocol = {
            k: v
            for k, v in dataclasses.asdict(layout).items()
            if k not in ("rgb", "depth", "intrinsics", "poses", "match_names")
        }
        self.info.metadata.update(
            depth_kind="metric",
            min_depth=layouts.BENCHMARK_MIN_DEPTH,
            videos={"test": _video_table(videos)},
            **protocol,
        )
        return {"test": self._generate_examples(videos, layout.depth_scale, same_size=False)}


@dataclasses.dataclass
class PseudoLabelConfig(tfds.core.BuilderConfig):
    """Images labelled by a teacher model.

    Attributes:
      depth_kind: what the teacher wrote: "disparity" (Depth Anything's relative output) or "metric".
    """

    depth_kind: str = "disparity"


class VdaPseudoLabels(_FolderBuilder):
    """Single images with teacher depth (T = 1 examples), from the pseudo-label layout."""

    BUILDER_CONFIGS = [PseudoLabelConfig(name="default")]
    DEPTH_DTYPE = np.float16

    def _split_generators(self, dl_manager):
        folders = layouts.split_folders(os.fspath(dl_manager.manual_dir))
        self.info.metadata.update(depth_kind=self.builder_config.depth_kind, max_depth=None)
        return {s: self._generate_examples(self._images(folder), 1.0, same_size=True) for s, folder in folders.items()}

    @staticmethod
    def _images(folder: str) -> list[layouts.Video]:
        """Each image as a one-frame video."""
        return [
            layouts.Video(files.stem(image), (image,), (depth,)) for image, depth in layouts.pseudo_label_images(folder)
        ]


def prepare(
    builder_cls: type[tfds.core.GeneratorBasedBuilder],
    data_dir: str,
    *,
    config: str | tfds.core.BuilderConfig | None = None,
    source_dir: str | None = None,
    **kwargs,
) -> tfds.core.DatasetBuilder:
    """Writes a dataset as ArrayRecord under data_dir (once) and returns its builder.

    Args:
      builder_cls: one of the builders above.
      data_dir: TFDS data directory to write to and later read from.
      config: a predefined config name or a config object (its ``name`` names the dataset).
      source_dir: the folder to read, for the folder-based builders.
      **kwargs: passed to the builder (e.g. ``workers`` for VdaSynthetic).
    """
    check_output_folder(data_dir, "data_dir")  # before tfds announces "Downloading and preparing"
    builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record", **kwargs)
    download_config = tfds.download.DownloadConfig(manual_dir=source_dir) if source_dir else None
    builder.download_and_prepare(download_config=download_config)
    return builder


def open_split(name: str, split: str, data_dir: str | None) -> tuple[Sequence[dict], dict]:
    """The data source of a built split of a vda dataset, and the dataset's metadata.

    Args:
      name: "<dataset>/<config>", e.g. "vda_synthetic/tiny".
      split: e.g. "train".
      data_dir: the TFDS data directory it was built in (None: TFDS's default).

    Raises:
      ValueError: the dataset is unknown, not built in ``data_dir``, or has no such split.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = sorted(b.name for b in (VdaBenchmark, VdaPseudoLabels, VdaSynthetic, VdaVideoFolder))
        raise ValueError(f"unknown dataset {name!r}; the vda datasets are {known} (with /config)") from None
    except ValueError:  # a config that is neither predefined nor built in data_dir
        builder = None
    if builder is None or not builder.is_prepared():
        where = builder.data_dir if builder else data_dir or "the default TFDS data directory"
        if data_dir and os.path.isdir(os.path.join(data_dir, "checkpoints")):  # a training workdir
            raise ValueError(f"dataset {name} is not built in {where}: {data_dir} is a training workdir; its run "
                             f"renders synthetic data into {os.path.join(data_dir, 'data')}")
        raise ValueError(f"dataset {name} is not built in {where}: pass the data directory it was built in (a "
                         "training run renders its synthetic data into WORKDIR/data), or build it with "
                         "vda_jax.data.builders.prepare")
    if split not in builder.info.splits:
        raise ValueError(f"dataset {name} has no split {split!r}; its splits are {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split), dict(builder.info.metadata or {})
