"""Reading frames, depth maps and camera files from dataset folders.

Every reader raises ``ValueError`` naming the offending file, so a bad file deep inside a
dataset is found from the message alone (``ModuleNotFoundError`` for EXR without OpenEXR).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEPTH_EXTENSIONS = (".png", ".npy", ".exr")


def natural_key(name: str) -> list:
    """Sort key ordering embedded numbers by value: frame2 < frame10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_files(folder: str, extensions: Sequence[str]) -> list[str]:
    """Files directly in ``folder`` with one of ``extensions`` (any case), naturally sorted."""
    if not os.path.isdir(folder):
        raise ValueError(f"missing folder {folder}")
    names = [n for n in os.listdir(folder) if n.lower().endswith(tuple(extensions))]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image; fast zlib level 1 (decoding speed is the same at any level)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def read_rgb(path: str) -> tuple[bytes, tuple[int, int]]:
    """Encoded RGB image bytes and (height, width).

    PNG and JPEG files already in RGB are kept byte for byte; anything else (grey, palette,
    alpha, 16-bit) is converted to 8-bit RGB and re-encoded as PNG.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in ("PNG", "JPEG") and image.mode == "RGB":
                return data, (image.height, image.width)
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return encode_png(rgb), rgb.shape[:2]


def _read_exr(path: str) -> np.ndarray:
    try:
        import OpenEXR  # optional dependency
    except ImportError as e:
        raise ModuleNotFoundError(
            f"cannot read {path}: EXR depth needs the OpenEXR package "
            "(pip install 'vda-jax[exr]'), or convert the depth maps to .npy or 16-bit .png"
        ) from e
    try:
        with OpenEXR.File(path) as f:
            channels = {name: channel.pixels for name, channel in f.channels().items()}
    except RuntimeError as e:
        raise ValueError(f"cannot read EXR depth {path}: {e}") from e
    for name in ("Z", "depth", "Y", "R"):
        if name in channels:
            return channels[name]
    if "RGB" in channels or len(channels) == 1:
        return channels.get("RGB", next(iter(channels.values())))[..., 0]
    raise ValueError(f"EXR depth {path} has channels {sorted(channels)}; expected one of Z, depth, Y, R")


def read_depth(path: str, scale: float = 1.0) -> np.ndarray:
    """Depth [H, W] float32 = stored value / scale; non-finite and negative values become 0.

    Formats: 16-bit PNG (e.g. millimetres with scale 1000), .npy (float or integer, [H, W] or
    [H, W, 1]) and .exr (float, needs the optional OpenEXR package).
    """
    extension = os.path.splitext(path)[1].lower()
    if extension == ".exr":
        depth = _read_exr(path)
    elif extension == ".npy":
        try:
            depth = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read depth {path}: {e}") from e
    elif extension == ".png":
        try:
            with Image.open(path) as image:
                if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
                    raise ValueError(f"depth PNG {path} has mode {image.mode}; expected a 16-bit single-channel PNG")
                depth = np.asarray(image)
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot read depth {path}: {e}") from e
    else:
        raise ValueError(f"unsupported depth file {path}; use one of {DEPTH_EXTENSIONS}")
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or not (np.issubdtype(depth.dtype, np.floating) or np.issubdtype(depth.dtype, np.integer)):
        raise ValueError(f"depth {path} has shape {depth.shape} and dtype {depth.dtype}; expected numbers [H, W]")
    depth = depth.astype(np.float32) / np.float32(scale)
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(0))


def read_numbers(path: str) -> np.ndarray:
    """[rows, cols] float64 numbers of a whitespace- or comma-separated text file (``#`` comments)."""
    try:
        with open(path) as f:
            rows = [line.split("#")[0].replace(",", " ").split() for line in f]
        rows = [[float(x) for x in row] for row in rows if row]
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read numbers from {path}: {e}") from e
    if not rows or len({len(row) for row in rows}) != 1:
        raise ValueError(f"{path} must hold rows of numbers, all of the same length")
    return np.array(rows)


def read_intrinsics(path: str, num_frames: int) -> np.ndarray:
    """K [T, 3, 3] from a text file.

    Accepted: one K for all frames as a 3x3 matrix (last row 0 0 1) or a 4x4 one (last row
    0 0 0 1, as ScanNet writes them; its top-left 3x3 is K); or rows "fx fy cx cy" or of 9
    numbers (row-major K), either one row for all frames or one per frame.
    """
    v = read_numbers(path)
    if (v.shape == (3, 3) and (v[2] == [0, 0, 1]).all()) or (v.shape == (4, 4) and (v[3] == [0, 0, 0, 1]).all()):
        return np.broadcast_to(v[:3, :3], (num_frames, 3, 3)).copy()
    if v.shape[1] in (4, 9) and v.shape[0] in (1, num_frames):
        if v.shape[1] == 4:
            K = np.zeros((len(v), 3, 3))
            K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = v[:, 0], v[:, 1], v[:, 2], v[:, 3], 1
        else:
            K = v.reshape(-1, 3, 3)
        return np.broadcast_to(K, (num_frames, 3, 3)).copy()
    raise ValueError(
        f"{path} holds {v.shape[0]} rows of {v.shape[1]} numbers; expected a 3x3 or 4x4 K matrix, or one "
        f"row (for all frames) or {num_frames} rows (one per frame) of 'fx fy cx cy' or of 9 numbers"
    )


def read_pose_matrix(path: str) -> np.ndarray:
    """One camera-to-world [4, 4] pose from a file holding 3x4 or 4x4 rows (or one row of 12/16)."""
    v = read_numbers(path).reshape(-1)
    if v.size not in (12, 16):
        raise ValueError(f"{path} holds {v.size} numbers; expected a 3x4 or 4x4 camera-to-world matrix")
    pose = np.eye(4)
    pose[:3] = v.reshape(-1, 4)[:3]
    return pose


def read_poses(path: str, num_frames: int) -> np.ndarray:
    """Camera-to-world poses [T, 4, 4] from a file with one row of 12 (3x4) or 16 (4x4) numbers per frame."""
    v = read_numbers(path)
    if v.shape[0] != num_frames or v.shape[1] not in (12, 16):
        raise ValueError(
            f"{path} holds {v.shape[0]} rows of {v.shape[1]} numbers; expected {num_frames} rows "
            "(one per frame) of 12 or 16 numbers (row-major camera-to-world 3x4 or 4x4)"
        )
    poses = np.broadcast_to(np.eye(4), (num_frames, 4, 4)).copy()
    poses[:, :3] = v.reshape(num_frames, -1, 4)[:, :3]
    return poses
