"""Teacher pseudo-labels for a folder of images, in the layout ``builders.VdaPseudoLabels`` reads.

Every image is run as a one-frame clip (T = 1), the way Depth Anything V2's ``infer_image``
does: resized for the network (short side >= input_size, multiples of 14, OpenCV cubic),
normalised, predicted, and the depth resized back to the image's size (bilinear,
align_corners=True), with no aspect-ratio limit on the input size. The image
``images_dir/<path>.<ext>`` gets the label ``output_dir/depth/<path>.npy``: float16
``[H, W]``, the model's output (disparity for relative models). ``output_dir/images`` is
made a link to ``images_dir``, so ``output_dir`` is the builder's source folder.

Images are batched by network input size, and the next batch is decoded while the device
runs the last. Only the model runs on the device, compiled once per network input size; the
resizes (the exact taps of ``vda_jax.ops.taps``) run on the host in NumPy, so images of many
sizes that share a network size share one compiled step. Each label is written under a
temporary name and renamed, and images that have a label are skipped, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tqdm
from flax import nnx
from PIL import Image

from vda_jax import compilation_cache
from vda_jax.data import files
from vda_jax.inference.sizing import network_size
from vda_jax.io.paths import check_output_folder
from vda_jax.io.video import AtomicPath
from vda_jax.models.vda import VideoDepthAnything, compute_model
from vda_jax.runtime.preprocess import preprocess, resize_depth
from vda_jax.xla_options import compiler_options


class UnreadableImagesError(ValueError):
    """Some images could not be read; every other one was labelled."""


def label_path(output_dir: str, image: str) -> str:
    """The label of ``image`` (a path relative to the images folder)."""
    return os.path.join(output_dir, "depth", os.path.splitext(image)[0] + ".npy")


def check_folders(images_dir: str, output_dir: str) -> None:
    """Raises ValueError unless ``images_dir`` holds images and ``output_dir`` can take the labels."""
    _image_files(images_dir)
    images, output = os.path.realpath(images_dir), os.path.realpath(output_dir)
    if os.path.commonpath([images, output]) == images:
        raise ValueError(f"--output {output_dir} is inside the images folder {images_dir} (its labels would be "
                         "read as images); give a folder outside it")
    check_output_folder(output_dir, "--output")


def _image_files(images_dir: str) -> list[str]:
    """Paths of the images under ``images_dir``, relative to it, in natural order."""
    if os.path.isfile(images_dir):
        raise ValueError(f"images folder {images_dir} is a file; give the folder of the images")
    if not os.path.isdir(images_dir):
        raise ValueError(f"images folder {images_dir} does not exist")
    images = [
        os.path.relpath(os.path.join(folder, name), images_dir)
        for folder, _, names in os.walk(images_dir)  # as the builder lists them
        for name in names
        if name.lower().endswith(files.IMAGE_EXTENSIONS)
    ]
    if not images:
        raise ValueError(f"no images ({'/'.join(files.IMAGE_EXTENSIONS)}) under {images_dir}")
    by_label: dict[str, str] = {}
    for image in images:
        other = by_label.setdefault(os.path.splitext(image)[0], image)
        if other != image:
            raise ValueError(f"{other} and {image} in {images_dir} would share one label; rename one of them")
    return sorted(images, key=files.natural_key)


def _link_images(images_dir: str, output_dir: str) -> None:
    """Makes ``output_dir/images`` the images folder (a symlink unless it already is)."""
    link = os.path.join(output_dir, "images")
    if os.path.exists(link) and os.path.samefile(link, images_dir):
        return
    if os.path.lexists(link):
        raise ValueError(f"{link} exists and is not {images_dir}; choose another output folder")
    os.makedirs(output_dir, exist_ok=True)
    os.symlink(os.path.abspath(images_dir), link)


@contextlib.contextmanager
def _open_image(path: str) -> Iterator[Image.Image]:
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _image_size(path: str) -> tuple[int, int]:
    with _open_image(path) as image:  # reads the header only
        return image.height, image.width


def _read_image(path: str) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``, decoded like the builder does (no EXIF rotation)."""
    with _open_image(path) as image:
        return np.asarray(image.convert("RGB"))


@functools.lru_cache(maxsize=8)
def _predictor(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """Jitted ``(params, x)``: normalised images ``[B, h, w, 3]`` -> depth ``[B, h, w]``, each a one-frame clip."""

    def predict(params: nnx.State, x: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return model(x[:, None], model.frames_per_chunk(x.shape[1:3]))[:, 0]

    return jax.jit(predict, compiler_options=compiler_options())


def _write_labels(output_dir: str, images: list[str], sizes: list[tuple[int, int]], depth: jax.Array) -> None:
    for image, size, image_depth in zip(images, sizes, np.asarray(depth)):
        label = resize_depth(image_depth, size).astype(np.float16)
        if not np.isfinite(label).all():
            raise ValueError(f"the depth of {image} exceeds the float16 range of the labels")
        path = label_path(output_dir, image)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with AtomicPath(path) as tmp:
            np.save(tmp, label)


def pseudo_label(model: VideoDepthAnything, images_dir: str, output_dir: str, *, input_size: int = 518,
                 precision: str | None = None, batch_size: int = 8, progress: bool = True) -> int:
    """Labels every image under ``images_dir`` that has no label yet; returns how many it labelled.

    Raises:
      UnreadableImagesError: naming the images that could not be read, after labelling the others.

    Args:
      model: the teacher (any loaded model; run with T = 1).
      images_dir: folder of .png/.jpg images, searched recursively.
      output_dir: gets ``depth/`` with the labels and ``images`` linking to ``images_dir``.
      input_size: network input short side.
      precision: "fp32", "tf32" or "bf16" (default: bf16 on accelerators, fp32 on CPU).
      batch_size: images per model call.
      progress: show a progress bar.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = _image_files(images_dir)
    check_output_folder(output_dir, "--output")
    _link_images(images_dir, output_dir)
    unreadable: list[str] = []
    groups: dict[tuple[int, int], list[tuple[str, tuple[int, int]]]] = collections.defaultdict(list)
    for image in images:
        if not os.path.exists(label_path(output_dir, image)):
            try:
                size = _image_size(os.path.join(images_dir, image))
            except ValueError as e:
                unreadable.append(str(e))
                continue
            groups[network_size(size, input_size, limit_aspect=False)].append((image, size))
    batches = [(net_size, group[i:i + batch_size])
               for net_size, group in groups.items() for i in range(0, len(group), batch_size)]
    graphdef, params = nnx.split(compute_model(model, precision))
    compilation_cache.enable()
    predict = _predictor(graphdef)

    total = sum(len(batch) for _, batch in batches)
    labelled = 0
    with tqdm.tqdm(total=total, unit="image", disable=not progress, desc="pseudo-labels", dynamic_ncols=True) as bar:
        pending = None
        for net_size, batch in batches:
            x, readable = [], []
            for image, size in batch:
                try:
                    x.append(preprocess(_read_image(os.path.join(images_dir, image)), net_size))
                    readable.append((image, size))
                except ValueError as e:  # a valid header, broken data
                    unreadable.append(str(e))
                    bar.update()
            if not x:
                continue
            batch = readable
            x += x[-1:] * (batch_size - len(x))  # a full batch: one compiled step per network size
            depth = predict(params, np.stack(x))  # runs while the previous labels are written
            if pending:
                _write_labels(output_dir, *pending)
                bar.update(len(pending[0]))
                labelled += len(pending[0])
            pending = ([image for image, _ in batch], [size for _, size in batch], depth)
        if pending:
            _write_labels(output_dir, *pending)
            bar.update(len(pending[0]))
            labelled += len(pending[0])
    if unreadable:
        raise UnreadableImagesError(f"labelled {labelled} image(s), but {len(unreadable)} could not be read: "
                                    f"{'; '.join(unreadable)}; fix or remove them and run again")
    return labelled
