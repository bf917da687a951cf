"""The training input pipeline: grain over TFDS ArrayRecord data sources.

Clips of ``clip_frames`` frames, ``clip_stride`` apart, are cut from every video of a split
(one clip starting every ``clip_hop`` frames), shuffled, augmented (``transforms.augment``: one
random crop/flip/colour change per clip) and batched into global batches of ``batch_size``.
The order and the augmentations are those of one global stream, whatever the number of
processes: a process reads only its rows of each global batch (a ``grain.sharding.ShardOptions``
``(index, count)`` names the index-th of ``count`` equal row blocks), so global batch k is the
same for 1, 2 or N processes and a run can resume on another number of hosts. Optionally a
second stream of single images (T = 1, e.g. teacher pseudo-labels) is mixed in: a fraction
``image_ratio`` of the batches are image batches. Every batch is a dict of

    frames  uint8   [B, T, H, W, 3]
    depth   float32 [B, T, H, W]     (0 where invalid)
    mask    bool    [B, T, H, W]     (depth within the dataset's (min_depth or 0, max_depth))
    K       float32 [B, T, 3, 3]     (NaN where the dataset has none)
    pose    float32 [B, T, 4, 4]     (camera-to-world, OpenCV axes; NaN where none)
    video   int32   [B]              (video index in the split), frame int32 [B, T]
    kind    str                      "video" or "image" (pop it before device_put)

with T = clip_frames for video batches and T = 1 for image batches, and (H, W) = crop_size.

Everything is a grain ``MapDataset`` up to the final ``to_iter_dataset``, so element i of the
stream is a pure function of (config, shard, i): the same seed gives the same batches, and
the iterator's state is just a position (the number of batches taken, the same on every process),
which ``get_state``/``set_state`` save and restore exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import numpy as np

from vda_jax.data import builders, transforms

_PATCH = 14
_KINDS = ("video", "image")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline settings.

    Attributes:
      video_dataset: TFDS name of the clip source, e.g. "vda_synthetic/small".
      video_split: its split.
      image_dataset: TFDS name of the single-image source (None: videos only).
      image_split: its split.
      data_dir: TFDS data directory holding both.
      clip_frames: frames per clip (T).
      clip_stride: step between the frames of a clip.
      clip_hop: step between the first frames of consecutive clips of a video.
      crop_size: (H, W) of the output, multiples of 14.
      max_scale: random zoom in [1, max_scale] on top of the scale that covers the crop.
      flip_prob: probability of a horizontal flip.
      color_jitter: strength of the colour jitter (0 turns it off).
      batch_size: clips per video batch, over all processes (the global batch).
      image_batch_size: images per image batch, over all processes.
      image_ratio: fraction of the batches that are image batches.
      seed: seed of the shuffles and augmentations.
      num_epochs: passes over each stream; None repeats forever.
      read_threads: threads reading and augmenting batches.
      prefetch_batches: batches read ahead.
    """

    video_dataset: str = "vda_synthetic/small"
    video_split: str = "train"
    image_dataset: str | None = None
    image_split: str = "train"
    data_dir: str | None = None
    clip_frames: int = 32
    clip_stride: int = 1
    clip_hop: int = 1
    crop_size: tuple[int, int] = (518, 518)
    max_scale: float = 1.5
    flip_prob: float = 0.5
    color_jitter: float = 0.2
    batch_size: int = 2
    image_batch_size: int = 8
    image_ratio: float = 0.0
    seed: int = 0
    num_epochs: int | None = None
    read_threads: int = 4
    prefetch_batches: int = 4

    def __post_init__(self):
        checks = [
            (
                len(self.crop_size) == 2 and all(s > 0 and s % _PATCH == 0 for s in self.crop_size),
                f"crop_size must be two positive multiples of {_PATCH}, got {self.crop_size}",
            ),
            (
                min(self.clip_frames, self.clip_stride, self.clip_hop) >= 1,
                "clip_frames, clip_stride and clip_hop must be >= 1",
            ),
            (min(self.batch_size, self.image_batch_size) >= 1, "batch sizes must be >= 1"),
            (self.max_scale >= 1.0, f"max_scale must be >= 1, got {self.max_scale}"),
            (0.0 <= self.image_ratio < 1.0, f"image_ratio must be in [0, 1), got {self.image_ratio}"),
            (self.image_ratio == 0 or self.image_dataset, "image_ratio > 0 needs an image_dataset"),
            (0.0 <= self.flip_prob <= 1.0, f"flip_prob must be in [0, 1], got {self.flip_prob}"),
            (self.color_jitter >= 0.0, f"color_jitter must be >= 0 (0: off), got {self.color_jitter}"),
            (self.read_threads >= 1, f"read_threads must be >= 1, got {self.read_threads}"),
            (self.prefetch_batches >= 0, f"prefetch_batches must be >= 0, got {self.prefetch_batches}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid DataConfig: {message}")
        object.__setattr__(self, "crop_size", tuple(self.crop_size))


def clip_index(lengths: Sequence[int], clip_frames: int, stride: int, hop: int) -> np.ndarray:
    """Record indices [C, T] of every clip of videos stored back to back with these lengths."""
    span = (clip_frames - 1) * stride + 1
    offsets = np.cumsum([0, *lengths[:-1]])
    starts = [offset + np.arange(0, n - span + 1, hop) for offset, n in zip(offsets, lengths)]
    starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    return starts[:, None] + stride * np.arange(clip_frames)


class ClipSource:
    """Random access to clips: clip i stacks the frame records ``index[i]``.

    Returns dicts of ``frames`` [T, H, W, 3] uint8, ``depth`` [T, H, W] float32, ``mask``
    [T, H, W] bool, ``K`` [T, 3, 3], ``pose`` [T, 4, 4], ``video`` int32, ``frame`` [T] int32.
    """

    def __init__(self, frames: Sequence[dict], index: np.ndarray, metadata: dict, name: str):
        self._frames, self._index, self._name = frames, index, name
        self._min_depth = metadata.get("min_depth") or 0.0
        self._max_depth = metadata.get("max_depth")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        records = self._frames.__getitems__(self._index[i].tolist())
        videos = {int(r["video"]) for r in records}
        size = records[0]["rgb"].shape[:2]
        if len(videos) != 1:
            raise ValueError(
                f"{self._name}: clip {i} spans videos {sorted(videos)}; the metadata's video "
                "table does not match the records (rebuild the dataset)"
            )
        for r in records:
            if r["rgb"].shape[:2] != size or r["depth"].shape != size:
                raise ValueError(
                    f"{self._name}: frames {r['rgb'].shape[:2]} and depth {r['depth'].shape} of "
                    f"video {r['video']} differ from {size}; training needs aligned frames "
                    "and depth (benchmark sets are for evaluation)"
                )
        depth = np.stack([r["depth"] for r in records]).astype(np.float32)
        mask = depth > self._min_depth
        if self._max_depth is not None:
            mask &= depth < self._max_depth
        return {
            "frames": np.stack([r["rgb"] for r in records]),
            "depth": depth,
            "mask": mask,
            "K": np.stack([r["K"] for r in records]).astype(np.float32),
            "pose": np.stack([r["pose"] for r in records]).astype(np.float32),
            "video": np.int32(records[0]["video"]),
            "frame": np.array([r["frame"] for r in records], np.int32),
        }


def _with_kind(batch: dict, kind: str) -> dict:
    return {**batch, "kind": kind}


def _stream(
    config: DataConfig,
    name: str,
    split: str,
    clip_frames: int,
    batch_size: int,
    kind: str,
    shard: grain.sharding.ShardOptions,
) -> grain.MapDataset:
    """This shard's rows of the global batches of one dataset split; ``kind`` is "video" or "image"."""
    frames, metadata = builders.open_split(name, split, config.data_dir)
    table = metadata.get("videos", {}).get(split)
    if table is None and clip_frames > 1:
        raise ValueError(
            f"{name}:{split} holds single images (no video table in its metadata); "
            "use it as image_dataset or set clip_frames=1"
        )
    if batch_size % shard.shard_count:
        raise ValueError(f"a batch of {batch_size} does not split into {shard.shard_count} equal row blocks")
    lengths = table["lengths"] if table else [1] * len(frames)
    stride, hop = (config.clip_stride, config.clip_hop) if kind == "video" else (1, 1)
    index = clip_index(lengths, clip_frames, stride, hop)
    if len(index) < batch_size:
        raise ValueError(
            f"{name}:{split} has {len(index)} clips of {clip_frames} frames (stride "
            f"{config.clip_stride}), fewer than one batch of {batch_size}; use shorter clips or a smaller batch"
        )
    # One global stream (seeds per stream, not per process); every element is augmented from
    # its own index, so which process reads it does not change it.
    seeds = np.random.SeedSequence([config.seed, _KINDS.index(kind)]).generate_state(2)
    ds = grain.MapDataset.source(ClipSource(frames, index, metadata, f"{name}:{split}"))
    ds = ds.shuffle(seed=int(seeds[0])).repeat(config.num_epochs)
    if config.num_epochs is not None:
        ds = ds[: len(ds) // batch_size * batch_size]  # whole global batches only
    augment = functools.partial(
        transforms.augment,
        crop=config.crop_size,
        max_scale=config.max_scale,
        flip_prob=config.flip_prob,
        jitter=config.color_jitter,
    )
    # Row block j of global batch k is the (k * count + j)-th run of `rows` elements; grain
    # reads only the elements of the blocks taken. Only whole blocks exist (the cut above), and
    # drop_remainder keeps the endless stream's length an integer division (no float rounding
    # past sys.maxsize for blocks of one row).
    rows = batch_size // shard.shard_count
    ds = ds.random_map(augment, seed=int(seeds[1])).batch(rows, drop_remainder=True)
    ds = ds[shard.shard_index :: shard.shard_count]
    return ds.map(functools.partial(_with_kind, kind=kind))


def make_dataset(config: DataConfig, shard: grain.sharding.ShardOptions | None = None) -> grain.IterDataset:
    """The batch stream of ``config`` for one process.

    Args:
      config: the pipeline settings.
      shard: which rows of every global batch this process reads: block ``shard_index`` of
        ``shard_count`` equal blocks; defaults to the JAX process's
        (``grain.sharding.ShardByJaxProcess``). ``drop_remainder`` is ignored: only whole
        global batches are formed.
    """
    shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    ds = _stream(
        config, config.video_dataset, config.video_split, config.clip_frames, config.batch_size, "video", shard
    )
    if config.image_ratio > 0:
        images = _stream(config, config.image_dataset, config.image_split, 1, config.image_batch_size, "image", shard)
        ds = grain.MapDataset.mix([ds, images], weights=[1 - config.image_ratio, config.image_ratio])
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_batches)
    return ds.to_iter_dataset(read)
