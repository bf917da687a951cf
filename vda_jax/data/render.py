"""A vectorised NumPy ray caster for the synthetic scenes of ``scene.py``.

One primary ray per pixel centre. The planes are tested against every ray; each sphere and box
only against the rays of the pixel rectangle its bounding corners project to. Hits are shaded
per primitive with a procedural solid texture evaluated in the object's own frame (textures
move with their objects) and Lambert lighting from one directional light. Ray directions are
scaled so that their camera-frame z component is 1: the ray parameter t of a hit is then its
z-depth along the optical axis.

NumPy notes: 3x3 matrices are made contiguous before matmul and reductions over a trailing
axis of size 3 are written out; both are several times faster than the obvious spelling.
"""

from __future__ import annotations

import numpy as np

from vda_jax.data import scene as scene_lib

_EPS = 1e-4
# Values of the noise lattice, periodic with period 64 cells on each axis.
_LATTICE = np.random.default_rng(0).random(64**3).astype(np.float32)


def _norm2(x: np.ndarray) -> np.ndarray:
    """Squared norms over the last axis (of size 3)."""
    return x[..., 0] ** 2 + x[..., 1] ** 2 + x[..., 2] ** 2


def pixel_rays(K: np.ndarray, pose: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rays through the pixel centres (integer coordinates): origin [3], directions [H, W, 3].

    Directions are in world coordinates, scaled to z = 1 in the camera frame.
    """
    v, u = np.mgrid[:height, :width]
    pixels = np.stack([u, v, np.ones_like(u)], -1).astype(np.float64)
    to_world = np.ascontiguousarray((pose[:3, :3] @ np.linalg.inv(K)).T)
    return pose[:3, 3], pixels @ to_world


def intersect_planes(origin, dirs, normal, offset) -> np.ndarray:
    """[N, P] ray parameter of the hits with planes n . x = offset (inf where missed)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (offset - normal @ origin) / (dirs @ np.ascontiguousarray(normal.T))
    return np.where(t > _EPS, t, np.inf)


def intersect_spheres(origin, dirs, center, radius) -> np.ndarray:
    """[N, S] ray parameter of the first hit in front of the origin (inf where missed)."""
    oc = origin - center
    a = _norm2(dirs)[:, None]
    half_b = dirs @ np.ascontiguousarray(oc.T)
    c = _norm2(oc) - radius**2
    disc = half_b**2 - a * c
    root = np.sqrt(np.maximum(disc, 0))
    near, far = (-half_b - root) / a, (-half_b + root) / a
    t = np.where(near > _EPS, near, far)
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def intersect_boxes(origin, dirs, center, rotation, half) -> np.ndarray:
    """[N, B] ray parameter of the hits with oriented boxes (slab test in each box frame).

    rotation: [B, 3, 3] object-to-world; half: [B, 3] half sizes.
    """
    n, b = len(dirs), len(center)
    o = np.einsum("bji,bj->bi", rotation, origin - center)  # R^T (origin - c)
    d = (dirs @ rotation.transpose(1, 0, 2).reshape(3, 3 * b)).reshape(n, b, 3)  # R^T dirs
    t_in, t_out = np.full((n, b), -np.inf), np.full((n, b), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):
            inv = 1.0 / d[..., k]
            t1, t2 = (-half[:, k] - o[:, k]) * inv, (half[:, k] - o[:, k]) * inv
            t_in = np.maximum(t_in, np.minimum(t1, t2))
            t_out = np.minimum(t_out, np.maximum(t1, t2))
    t = np.where(t_in > _EPS, t_in, t_out)
    return np.where((t_out >= t_in) & (t > _EPS), t, np.inf)


def _bounding_corners(prims: scene_lib.Primitives) -> np.ndarray:
    """[S + B, 8, 3] world points whose convex hull holds each sphere, then each box."""
    signs = np.array(list(np.ndindex(2, 2, 2))) * 2.0 - 1.0  # [8, 3]
    spheres = prims.sphere_center[:, None] + prims.sphere_radius[:, None, None] * signs
    boxes = prims.box_center[:, None] + np.einsum("bij,bkj->bki", prims.box_rotation, prims.box_half[:, None] * signs)
    return np.concatenate([spheres, boxes])


def _pixel_rects(corners: np.ndarray, K: np.ndarray, pose: np.ndarray, height: int, width: int) -> np.ndarray:
    """[M, 4] pixel rectangles (y0, y1, x0, x1) holding the images of the corners' convex hulls.

    The hulls are first clipped to the half-space in front of the camera: the clipped hull is
    spanned by the corners in front and the crossings of the near plane by the segments
    joining a corner in front to one behind.
    """
    near = 1e-3
    cam = (corners - pose[:3, 3]) @ np.ascontiguousarray(pose[:3, :3])  # [M, 8, 3]
    z = cam[..., 2]
    front = z >= near
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = (near - z[:, :, None]) / (z[:, None, :] - z[:, :, None])  # [M, 8, 8]
        crossing = cam[:, :, None] + lam[..., None] * (cam[:, None] - cam[:, :, None])
    points = np.concatenate([cam, crossing.reshape(len(cam), 64, 3)], 1)
    valid = np.concatenate([front, (front[:, :, None] & ~front[:, None, :]).reshape(len(cam), 64)], 1)
    z = np.where(valid, np.maximum(points[..., 2], near), 1.0)
    u = (K[0, 0] * points[..., 0] + K[0, 1] * points[..., 1]) / z + K[0, 2]
    v = K[1, 1] * points[..., 1] / z + K[1, 2]
    rects = np.stack(
        [
            np.where(valid, v, np.inf).min(-1),
            np.where(valid, v, -np.inf).max(-1) + 1,
            np.where(valid, u, np.inf).min(-1),
            np.where(valid, u, -np.inf).max(-1) + 1,
        ],
        -1,
    )
    rects = np.clip(np.nan_to_num(np.floor(rects)), 0, [height, height, width, width]).astype(np.int64)
    rects[~front.any(-1)] = 0
    return rects


def cast(prims: scene_lib.Primitives, K: np.ndarray, pose: np.ndarray, height: int, width: int):
    """Nearest hit through every pixel centre.

    Returns:
      dirs: [H, W, 3] world ray directions (z_cam = 1); t: [H, W] ray parameter = z-depth (inf
      where nothing is hit); index: [H, W] primitive index (-1 where nothing is hit).
    """
    origin, dirs = pixel_rays(K, pose, height, width)
    planes = intersect_planes(origin, dirs.reshape(-1, 3), prims.plane_normal, prims.plane_offset)
    t, index = np.full(height * width, np.inf), np.zeros(height * width, np.int64)
    for i in range(planes.shape[1]):
        closer = planes[:, i] < t
        t[closer], index[closer] = planes[closer, i], i
    t, index = t.reshape(height, width), index.reshape(height, width)

    num_planes, num_spheres = len(prims.plane_offset), len(prims.sphere_radius)
    rects = _pixel_rects(_bounding_corners(prims), K, pose, height, width)
    for i, (y0, y1, x0, x1) in enumerate(rects):
        if y1 <= y0 or x1 <= x0:
            continue
        rays = dirs[y0:y1, x0:x1].reshape(-1, 3)
        if i < num_spheres:
            t_i = intersect_spheres(origin, rays, prims.sphere_center[i : i + 1], prims.sphere_radius[i : i + 1])
        else:
            b = slice(i - num_spheres, i - num_spheres + 1)
            t_i = intersect_boxes(origin, rays, prims.box_center[b], prims.box_rotation[b], prims.box_half[b])
        t_i = t_i.reshape(y1 - y0, x1 - x0)
        closer = t_i < t[y0:y1, x0:x1]
        t[y0:y1, x0:x1][closer] = t_i[closer]
        index[y0:y1, x0:x1][closer] = num_planes + i
    return dirs, t, np.where(np.isfinite(t), index, -1)


def _surface(prims: scene_lib.Primitives, i: int, points: np.ndarray):
    """World normals [n, 3] and object-frame coordinates [n, 3] of points on primitive i."""
    num_planes, num_spheres = len(prims.plane_offset), len(prims.sphere_radius)
    if i < num_planes:
        normal = prims.plane_normal[i]
        u = np.cross(normal, [1.0, 0, 0] if abs(normal[0]) < 0.9 else [0, 0, 1.0])
        u /= np.linalg.norm(u)
        local = points @ np.stack([u, np.cross(normal, u), np.zeros(3)], 1)
        return np.broadcast_to(normal, points.shape), local
    if i < num_planes + num_spheres:
        s = i - num_planes
        rel = points - prims.sphere_center[s]
        return rel / prims.sphere_radius[s], rel @ np.ascontiguousarray(prims.sphere_rotation[s])
    b = i - num_planes - num_spheres
    rotation = np.ascontiguousarray(prims.box_rotation[b])
    local = (points - prims.box_center[b]) @ rotation
    scaled = np.abs(local) / prims.box_half[b]
    face = np.zeros_like(local)
    face[:, 0] = (scaled[:, 0] >= scaled[:, 1]) & (scaled[:, 0] >= scaled[:, 2])
    face[:, 1] = (scaled[:, 1] > scaled[:, 0]) & (scaled[:, 1] >= scaled[:, 2])
    face[:, 2] = (scaled[:, 2] > scaled[:, 0]) & (scaled[:, 2] > scaled[:, 1])
    return (face * np.sign(local)) @ np.ascontiguousarray(rotation.T), local


def value_noise(p: np.ndarray) -> np.ndarray:
    """Smooth lattice noise in [0, 1] at points p [N, 3] (trilinear, smoothstep weights)."""
    cell = np.floor(p)
    f = (p - cell).astype(np.float32)
    w = f * f * (3 - 2 * f)
    cell = cell.astype(np.int64)
    weights = [(1 - w[:, k], w[:, k]) for k in range(3)]
    cells = [(cell[:, k] & 63, (cell[:, k] + 1) & 63) for k in range(3)]
    out = np.zeros(len(p), np.float32)
    for i, j, k in np.ndindex(2, 2, 2):
        lattice = _LATTICE[(cells[0][i] * 64 + cells[1][j]) * 64 + cells[2][k]]
        out += weights[0][i] * weights[1][j] * weights[2][k] * lattice
    return out


def _albedo(materials: scene_lib.Materials, i: int, local: np.ndarray) -> np.ndarray:
    """[n, 3] texture colour of primitive i at object-frame points local [n, 3]."""
    p = (local / materials.scale[i] + materials.offset[i]).astype(np.float32)
    kind = materials.kind[i]
    if kind == scene_lib.CHECKER:
        mix = np.floor(p[:, 0]) + np.floor(p[:, 1]) + np.floor(p[:, 2])
        mix = mix - 2 * np.floor(mix / 2)
    elif kind == scene_lib.STRIPES:
        mix = 0.5 + 0.5 * np.tanh(3 * np.sin(2 * np.pi * (p @ materials.direction[i].astype(np.float32))))
    else:
        mix = np.clip(1.6 * (0.65 * value_noise(p) + 0.35 * value_noise(2.7 * p)) - 0.3, 0, 1)
    grain = value_noise(6.0 * p + 17.0)  # fine detail on every surface
    a, b = materials.color_a[i].astype(np.float32), materials.color_b[i].astype(np.float32)
    return (a + mix[:, None] * (b - a)) * (0.8 + 0.4 * grain)[:, None]


def shade(
    scene: scene_lib.Scene, prims: scene_lib.Primitives, points: np.ndarray, dirs: np.ndarray, index: np.ndarray
) -> np.ndarray:
    """Linear RGB [n, 3] of hits at points [n, 3] seen along dirs [n, 3] on primitives index [n]."""
    color = np.zeros(points.shape, np.float32)
    order = np.argsort(index, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(index[order])) + 1):
        i = index[group[0]]
        normal, local = _surface(prims, i, points[group])
        d = dirs[group]
        cos_light = normal @ scene.light
        # Two-sided surfaces: flip the normals that face away from the camera.
        facing = -np.sign(normal[:, 0] * d[:, 0] + normal[:, 1] * d[:, 1] + normal[:, 2] * d[:, 2])
        light = scene.ambient + (1 - scene.ambient) * np.clip(facing * cos_light, 0, None)
        color[group] = _albedo(prims.materials, i, local) * light[:, None].astype(np.float32)
    return color


def render_frame(
    scene: scene_lib.Scene, t: float, K: np.ndarray, pose: np.ndarray, height: int, width: int
) -> dict[str, np.ndarray]:
    """Renders ``scene`` at time t (s) seen by a camera with intrinsics K, camera-to-world pose.

    Returns:
      rgb: [H, W, 3] float32 in [0, 1] (gamma-encoded); depth: [H, W] float32 z-depth, 0 where
      invalid (sky, beyond ``scene.far``); mask: [H, W] bool valid depth; dynamic: [H, W] bool
      valid pixels showing a moving primitive.
    """
    prims = scene.at(t)
    dirs, t_hit, index = cast(prims, K, pose, height, width)
    dirs, t_hit, index = dirs.reshape(-1, 3), t_hit.ravel(), index.ravel()
    ray_length = np.sqrt(_norm2(dirs))
    valid = np.isfinite(t_hit) & (t_hit * ray_length <= scene.far)

    up = np.sqrt(np.clip(dirs[:, 1] / ray_length, 0, 1)).astype(np.float32)[:, None]
    color = scene.sky_horizon.astype(np.float32) + up * (scene.sky_top - scene.sky_horizon).astype(np.float32)
    hit = np.flatnonzero(index >= 0)
    points = pose[:3, 3] + t_hit[hit, None] * dirs[hit]
    haze = np.exp(-t_hit[hit] * ray_length[hit] / scene.fog).astype(np.float32)[:, None]
    shaded = shade(scene, prims, points, dirs[hit], index[hit])
    color[hit] = haze * shaded + (1 - haze) * scene.sky_horizon.astype(np.float32)

    dynamic = np.zeros(len(index), bool)
    dynamic[hit] = prims.dynamic[index[hit]]
    return dict(
        rgb=np.sqrt(np.clip(color, 0, 1)).reshape(height, width, 3),  # gamma 2 encoding
        depth=np.where(valid, t_hit, 0).reshape(height, width).astype(np.float32),
        mask=valid.reshape(height, width),
        dynamic=(dynamic & valid).reshape(height, width),
    )
