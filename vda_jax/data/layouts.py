"""Folder layouts of RGB-D videos: which files make up each video, in order.

Three layouts:
  * generic: ``<root>/<video>/rgb/*.{png,jpg}`` and ``<root>/<video>/depth/*.{png,npy,exr}``
    paired by file name, with optional ``<video>/intrinsics.txt`` and ``<video>/poses.txt``;
  * the official Video Depth Anything benchmark, as its extraction scripts
    (``benchmark/dataset_extract/*.py``) write KITTI, Bonn, ScanNet, NYUv2 and Sintel, with the
    depth encodings, caps, crops and frame selections of its evaluation (``benchmark/eval``);
  * pseudo-labelled images: ``<root>/images/**/<name>.{png,jpg}`` with the teacher's depth or
    disparity in ``<root>/depth/**/<name>.npy``.
If ``<root>`` holds ``train/``, ``validation/`` or ``test/`` folders, each is a split in that layout.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from vda_jax.data import files

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Video:
    """The files of one video: frames and depth maps in order, optional cameras.

    Attributes:
      name: the video's folder name.
      rgb, depth: T paths each.
      K: [T, 3, 3] intrinsics or None; pose: [T, 4, 4] camera-to-world (OpenCV axes) or None.
    """

    name: str
    rgb: tuple[str, ...]
    depth: tuple[str, ...]
    K: np.ndarray | None = None
    pose: np.ndarray | None = None


def split_folders(root: str) -> dict[str, str]:
    """{split: folder}: the train/validation/test subfolders of root if any, else {"train": root}."""
    if not os.path.isdir(root):
        raise ValueError(f"dataset folder {root} does not exist")
    found = {s: os.path.join(root, s) for s in SPLITS if os.path.isdir(os.path.join(root, s))}
    return found or {"train": root}


def pair_by_name(rgb: list[str], depth: list[str], depth_folder: str) -> list[str]:
    """The depth file of each frame, matched by file name without extension."""
    by_stem: dict[str, str] = {}
    for path in depth:
        if files.stem(path) in by_stem:
            raise ValueError(f"two depth maps for one frame: {by_stem[files.stem(path)]} and {path}")
        by_stem[files.stem(path)] = path
    missing = [p for p in rgb if files.stem(p) not in by_stem]
    if missing:
        raise ValueError(
            f"no depth map for frame {missing[0]} (expected {depth_folder}/{files.stem(missing[0])}"
            f".{{png,npy,exr}}; {len(missing)} frame(s) lack depth)"
        )
    extra = sorted(set(by_stem) - {files.stem(p) for p in rgb})
    if extra:
        raise ValueError(f"depth map {by_stem[extra[0]]} has no frame of the same name")
    return [by_stem[files.stem(p)] for p in rgb]


def folder_videos(root: str) -> list[Video]:
    """Videos of the generic layout: one folder per video under root."""
    names = sorted((n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n, "rgb"))), key=files.natural_key)
    if not names:
        raise ValueError(f"no video folders in {root}: expected {root}/<video>/rgb/ and {root}/<video>/depth/")
    videos = []
    for name in names:
        folder = os.path.join(root, name)
        rgb = files.list_files(os.path.join(folder, "rgb"), files.IMAGE_EXTENSIONS)
        if not rgb:
            raise ValueError(f"no frames ({'/'.join(files.IMAGE_EXTENSIONS)}) in {folder}/rgb")
        depth_folder = os.path.join(folder, "depth")
        depth = pair_by_name(rgb, files.list_files(depth_folder, files.DEPTH_EXTENSIONS), depth_folder)
        K_file, pose_file = os.path.join(folder, "intrinsics.txt"), os.path.join(folder, "poses.txt")
        videos.append(
            Video(
                name=name,
                rgb=tuple(rgb),
                depth=tuple(depth),
                K=files.read_intrinsics(K_file, len(rgb)) if os.path.exists(K_file) else None,
                pose=files.read_poses(pose_file, len(rgb)) if os.path.exists(pose_file) else None,
            )
        )
    return videos


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """How one official benchmark dataset is laid out and evaluated.

    Attributes:
      rgb, depth: per-video frame folders relative to the root, with ``{video}`` for the name.
      depth_scale: stored 16-bit PNG value / depth_scale = metres.
      max_depth: ground truth at or beyond this is not evaluated (the cap).
      gt_crop: (top, bottom, left, right) Python slice bounds (None = open) of the stored
        depth map that is evaluated; the prediction is resized to the cropped size.
      frames: (start, stop, step) of each video's sorted frames that the benchmark uses.
      match_names: pair frames and depth maps by name (else by sorted order, as Bonn's
        timestamps differ between the two).
      intrinsics: file with a 4x4 (or 3x3) K of the depth camera, ``{video}`` for the name.
      poses: per-frame camera-to-world 4x4 files, ``{video}`` and ``{frame}`` (rgb file stem).
      crop_prediction: the prediction is cropped with gt_crop too (frames are uncropped).
      eval_frames: (start, stop) of the stored frames that are scored.
      eval_videos: how many videos (in name order) are scored; None for all.
    """

    rgb: str
    depth: str
    depth_scale: float
    max_depth: float
    gt_crop: tuple[int | None, int | None, int | None, int | None]
    frames: tuple[int, int, int]
    match_names: bool = True
    intrinsics: str | None = None
    poses: str | None = None
    crop_prediction: bool = False
    eval_frames: tuple[int, int] | None = None
    eval_videos: int | None = None


# The official evaluation's valid ground truth is depth > 1e-3 (its min_depth_eval of 0.1 is
# unused) and < max_depth. Extraction crops KITTI/Bonn frames to even sizes and the NYUv2
# and ScanNet frames with the same window as gt_crop, so cropped depth and frames align.
# Sintel: the official extraction stores depth as uint16 whole metres while its evaluation
# divides by 65535 / 650; both are reproduced as they are.
_SCANNET = Benchmark(
    "{video}/color",
    "{video}/depth",
    1000.0,
    10.0,
    (8, -8, 11, -11),
    (0, 270, 3),
    intrinsics="{video}/intrinsic/intrinsic_depth.txt",
    poses="{video}/pose/{frame}.txt",
)
BENCHMARKS = {
    "kitti": Benchmark("{video}/rgb", "{video}/depth", 256.0, 80.0, (0, 374, 0, 1242), (0, 110, 1)),
    "kitti_500": Benchmark("{video}/rgb", "{video}/depth", 256.0, 80.0, (0, 374, 0, 1242), (0, 500, 1)),
    "bonn": Benchmark("{video}/rgb", "{video}/depth", 5000.0, 10.0, (0, 480, 0, 640), (30, 140, 1), match_names=False),
    "bonn_500": Benchmark(
        "{video}/rgb", "{video}/depth", 5000.0, 10.0, (0, 480, 0, 640), (0, 500, 1), match_names=False
    ),
    "scannet": _SCANNET,
    "scannet_500": dataclasses.replace(_SCANNET, frames=(0, 500, 1)),
    "scannet_tae": dataclasses.replace(_SCANNET, rgb="{video}/color_origin", frames=(0, 192, 1), crop_prediction=True,
                                       eval_frames=(10, 180), eval_videos=20),
    "nyuv2_500": Benchmark("{video}/rgb", "{video}/depth", 6000.0, 10.0, (45, 471, 41, 601), (0, 500, 1)),
    "sintel": Benchmark("clean/{video}", "depth/{video}", 65535 / 650, 70.0, (0, 436, 0, 1024), (0, 100, 1)),
}
BENCHMARK_MIN_DEPTH = 1e-3


def benchmark_videos(root: str, bench: Benchmark) -> list[Video]:
    """Videos of an official benchmark layout, restricted to its frame selection."""
    parent = os.path.join(root, bench.rgb.split("{video}")[0])
    if not os.path.isdir(parent):
        raise ValueError(f"missing folder {parent}: expected the layout {root}/{bench.rgb}")
    names = sorted(
        (n for n in os.listdir(parent) if os.path.isdir(os.path.join(root, bench.rgb.format(video=n)))),
        key=files.natural_key,
    )
    if not names:
        raise ValueError(f"no videos in {root}: expected folders {root}/{bench.rgb}")
    videos = []
    for name in names:
        rgb = files.list_files(os.path.join(root, bench.rgb.format(video=name)), files.IMAGE_EXTENSIONS)
        depth_folder = os.path.join(root, bench.depth.format(video=name))
        depth = files.list_files(depth_folder, (".png",))
        if bench.match_names:
            depth = pair_by_name(rgb, depth, depth_folder)
        elif len(rgb) != len(depth):
            raise ValueError(
                f"{len(rgb)} frames in {os.path.dirname(rgb[0]) if rgb else name} but {len(depth)} "
                f"depth maps in {depth_folder}; they are paired in sorted order so must be as many"
            )
        keep = slice(*bench.frames)
        rgb, depth = rgb[keep], depth[keep]
        if not rgb:
            raise ValueError(f"no frames of video {name} in {root} fall in the benchmark's selection {bench.frames}")
        K = pose = None
        if bench.intrinsics:
            K = files.read_intrinsics(os.path.join(root, bench.intrinsics.format(video=name)), len(rgb))
        if bench.poses:
            pose = np.stack(
                [
                    files.read_pose_matrix(os.path.join(root, bench.poses.format(video=name, frame=files.stem(p))))
                    for p in rgb
                ]
            )
        videos.append(Video(name, tuple(rgb), tuple(depth), K, pose))
    return videos


def pseudo_label_images(root: str) -> list[tuple[str, str]]:
    """(image, depth) pairs of the pseudo-label layout, in natural path order."""
    image_root, depth_root = os.path.join(root, "images"), os.path.join(root, "depth")
    for folder in (image_root, depth_root):
        if not os.path.isdir(folder):
            raise ValueError(f"missing folder {folder}: expected {root}/images/ and {root}/depth/")
    pairs = []
    for folder, _, names in os.walk(image_root):
        for name in names:
            if name.lower().endswith(files.IMAGE_EXTENSIONS):
                relative = os.path.relpath(os.path.join(folder, name), image_root)
                depth = os.path.join(depth_root, os.path.splitext(relative)[0] + ".npy")
                if not os.path.exists(depth):
                    raise ValueError(f"no depth for image {os.path.join(folder, name)}: expected {depth}")
                pairs.append((os.path.join(folder, name), depth))
    if not pairs:
        raise ValueError(f"no images in {image_root}")
    return sorted(pairs, key=lambda p: files.natural_key(p[0]))
