"""The synthetic renderer against closed-form geometry and multi-view consistency."""

import dataclasses

import numpy as np
import pytest

from vda_jax.data import render
from vda_jax.data import scene as scene_lib
from vda_jax.data.synthetic import render_video

H, W = 36, 48


def make_scene(planes=(), spheres=(), boxes=(), sphere_velocity=None) -> scene_lib.Scene:
    """A scene from (normal, offset), (center, radius) and (center, half, yaw) tuples."""
    rng = np.random.default_rng(0)
    n_p, n_s, n_b = len(planes), len(spheres), len(boxes)
    velocity = np.zeros((n_s, 3)) if sphere_velocity is None else np.asarray(sphere_velocity, float)
    return scene_lib.Scene(
        plane_normal=np.array([p[0] for p in planes], float).reshape(n_p, 3),
        plane_offset=np.array([p[1] for p in planes], float),
        sphere_center=np.array([s[0] for s in spheres], float).reshape(n_s, 3),
        sphere_radius=np.array([s[1] for s in spheres], float),
        sphere_motion=dataclasses.replace(scene_lib.Motion.still(n_s), velocity=velocity),
        box_center=np.array([b[0] for b in boxes], float).reshape(n_b, 3),
        box_half=np.array([b[1] for b in boxes], float).reshape(n_b, 3),
        box_yaw=np.array([b[2] for b in boxes], float),
        box_motion=scene_lib.Motion.still(n_b),
        materials=scene_lib.sample_materials(rng, n_p + n_s + n_b, (0.1, 1.0)),
        light=np.array([0.0, 1.0, 0.0]),
        ambient=0.3,
        sky_top=np.array([0.2, 0.4, 0.8]),
        sky_horizon=np.array([0.8, 0.8, 0.9]),
    )


def intrinsics(f=40.0, cx=23.5, cy=17.0):
    return np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])


def unit_rays_cam(K, height=H, width=W):
    """Camera-frame rays K^-1 [u, v, 1] of every pixel, [H, W, 3] (z = 1)."""
    v, u = np.mgrid[:height, :width]
    return np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T


def backproject(depth, K, pose):
    """World points [H, W, 3] of a z-depth map."""
    cam = unit_rays_cam(K, *depth.shape) * depth[..., None]
    return cam @ pose[:3, :3].T + pose[:3, 3]


def test_tilted_plane_depth_is_closed_form():
    normal = np.array([0.3, 1.0, -0.4]) / np.linalg.norm([0.3, 1.0, -0.4])
    scene = make_scene(planes=[(normal, -0.5)])
    pose = scene_lib.look_at(np.array([0.2, 1.5, -1.0]), np.array([0.5, 1.0, 3.0]))
    K = intrinsics()
    out = render.render_frame(scene, 0.0, K, pose, H, W)
    # In camera coordinates the plane is n_c . X = d_c, so a pixel's z-depth is d_c / (n_c . K^-1 [u, v, 1]).
    n_cam = pose[:3, :3].T @ normal
    d_cam = -0.5 - normal @ pose[:3, 3]
    expected = d_cam / (unit_rays_cam(K) @ n_cam)
    visible = expected > 0
    assert 0.3 < visible.mean() < 1.0  # the horizon crosses the image
    np.testing.assert_allclose(out["depth"][visible], expected[visible], rtol=1e-5)
    assert not out["mask"][~visible].any() and (out["depth"][~visible] == 0).all()


def test_floor_is_below_the_principal_point():
    """OpenCV axes: image rows grow downwards, so a level camera sees the floor in the lower half."""
    scene = make_scene(planes=[((0, 1, 0), 0.0)])
    pose = scene_lib.look_at(np.array([0.0, 1.6, 0.0]), np.array([0.0, 1.6, 5.0]))
    out = render.render_frame(scene, 0.0, intrinsics(), pose, H, W)
    rows = np.arange(H)
    np.testing.assert_array_equal(out["mask"].all(1), rows > 17.0)
    np.testing.assert_array_equal(out["mask"].any(1), rows > 17.0)
    # Row v of the floor sits at depth f * height / (v - cy).
    np.testing.assert_allclose(out["depth"][rows > 17, 0], 40.0 * 1.6 / (rows[rows > 17] - 17.0), rtol=1e-6)


def test_sphere_depth_and_silhouette_are_closed_form():
    center, radius = np.array([0.3, 1.2, 4.0]), 0.9
    scene = make_scene(planes=[((0, 0, -1), -20.0)], spheres=[(center, radius)])
    pose = scene_lib.look_at(np.array([0.0, 1.0, 0.0]), center + np.array([0.4, 0.2, 0.0]))
    K = intrinsics()
    out = render.render_frame(scene, 0.0, K, pose, H, W)
    dirs = unit_rays_cam(K) @ pose[:3, :3].T  # world rays with z_cam = 1
    to_center = center - pose[:3, 3]
    along = dirs @ to_center / np.linalg.norm(dirs, axis=-1)  # distance along the unit ray to the closest point
    miss2 = to_center @ to_center - along**2  # squared distance of the centre from the ray
    inside, outside = miss2 < (0.98 * radius) ** 2, miss2 > (1.02 * radius) ** 2
    assert inside.sum() > 50 and outside.sum() > 50
    ray_length = along - np.sqrt(np.maximum(radius**2 - miss2, 0))
    expected = ray_length / np.linalg.norm(dirs, axis=-1)  # z-depth = ray length / |ray with z = 1|
    np.testing.assert_allclose(out["depth"][inside], expected[inside], rtol=1e-6)
    assert (out["depth"][outside] > 15).all()  # the back wall, not the sphere


def test_rotated_box_surface():
    center, half, yaw = np.array([0.0, 0.8, 5.0]), np.array([0.6, 0.8, 0.4]), 0.6
    scene = make_scene(boxes=[(center, half, yaw)])
    pose = scene_lib.look_at(np.array([0.5, 2.0, 0.0]), center)
    K = intrinsics()
    out = render.render_frame(scene, 0.0, K, pose, H, W)
    assert 100 < out["mask"].sum() < H * W
    local = (backproject(out["depth"], K, pose) - center) @ scene_lib.yaw_matrix(np.array(yaw))
    np.testing.assert_allclose((np.abs(local) / half).max(-1)[out["mask"]], 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["room", "outdoor"])
def test_culled_cast_equals_brute_force(kind):
    rng = np.random.default_rng(3)
    scene, path = scene_lib.SCENE_KINDS[kind](rng, 1.0)
    K, pose = path.intrinsics(H, W), path.pose(0.4)
    prims = scene.at(0.4)
    dirs, t, index = render.cast(prims, K, pose, H, W)
    origin, rays = pose[:3, 3], dirs.reshape(-1, 3)
    every = np.concatenate(
        [
            render.intersect_planes(origin, rays, prims.plane_normal, prims.plane_offset),
            render.intersect_spheres(origin, rays, prims.sphere_center, prims.sphere_radius),
            render.intersect_boxes(origin, rays, prims.box_center, prims.box_rotation, prims.box_half),
        ],
        1,
    )
    nearest = every.min(1)
    np.testing.assert_allclose(t.ravel(), nearest, rtol=1e-12)
    hit = np.isfinite(nearest)
    assert hit.mean() > 0.5
    np.testing.assert_array_equal(index.ravel() >= 0, hit)
    np.testing.assert_allclose(every[np.flatnonzero(hit), index.ravel()[hit]], nearest[hit], rtol=1e-12)


def warp_abs_rel(depth0, depth1, K, pose0, pose1, keep0, keep1):
    """Frame 0's depth reprojected into frame 1 and compared there, AbsRel per frame-0 pixel.

    Like the official TAE but sampling frame 1 at the exact projected position: inverse depth
    is affine in pixel coordinates on a plane, so bilinear interpolation of 1 / depth1 is exact
    on planar surfaces. Only positions whose four neighbours are all in keep1 are compared;
    the others (and pixels outside keep0) are NaN.
    """
    height, width = depth0.shape
    points = backproject(depth0, K, pose0)
    cam = (points - pose1[:3, 3]) @ pose1[:3, :3]
    z = np.where(keep0, cam[..., 2], np.nan)
    u = cam[..., 0] / z * K[0, 0] + K[0, 2]
    v = cam[..., 1] / z * K[1, 1] + K[1, 2]
    inside = (z > 0) & (u >= 0) & (u < width - 1) & (v >= 0) & (v < height - 1)
    u0, v0 = np.where(inside, np.floor(u), 0).astype(int), np.where(inside, np.floor(v), 0).astype(int)
    fu, fv = u - u0, v - v0
    corners = [
        (v0, u0, (1 - fv) * (1 - fu)),
        (v0, u0 + 1, (1 - fv) * fu),
        (v0 + 1, u0, fv * (1 - fu)),
        (v0 + 1, u0 + 1, fv * fu),
    ]
    inv_depth = sum(w / np.where(keep1, depth1, np.nan)[r, c] for r, c, w in corners)
    return np.where(inside, np.abs(z * inv_depth - 1), np.nan)


@pytest.mark.parametrize("seed,kind", [(0, "room"), (1, "room"), (2, "outdoor"), (3, "outdoor")])
def test_static_depth_is_consistent_across_frames(seed, kind):
    video = render_video(seed, 3, 48, 64, scene_kind=kind)
    K = video["K"][0].astype(float)
    for t in range(2):
        static0 = video["mask"][t] & ~video["dynamic"][t]
        static1 = video["mask"][t + 1] & ~video["dynamic"][t + 1]
        pose0, pose1 = video["pose"][t].astype(float), video["pose"][t + 1].astype(float)
        err = warp_abs_rel(video["depth"][t], video["depth"][t + 1], K, pose0, pose1, static0, static1)
        err = err[np.isfinite(err)]
        assert err.size > 0.3 * static0.size
        # Exact up to float32 rounding, except where the bilinear sample straddles a depth edge or
        # a crease, or lands on a curved surface (coarse spheres at this resolution).
        assert np.median(err) < 1e-6
        assert np.mean(err < 1e-3) > 0.8


def test_moving_object_breaks_consistency_only_where_it_is():
    scene = make_scene(
        planes=[((0, 1, 0), 0.0), ((0, 0, -1), -8.0)],
        spheres=[((0.0, 1.0, 4.0), 0.7)],
        boxes=[((-1.2, 0.5, 5.0), (0.4, 0.5, 0.4), 0.3)],
        sphere_velocity=[[3.0, 0.0, -2.0]],
    )
    K = intrinsics()
    poses = [scene_lib.look_at(np.array([x, 1.4, 0.0]), np.array([0.0, 0.8, 5.0])) for x in (0.0, 0.1)]
    frames = [render.render_frame(scene, t, K, pose, H, W) for t, pose in zip((0.0, 0.1), poses)]
    moving0, moving1 = frames[0]["dynamic"], frames[1]["dynamic"]
    assert moving0.sum() > 30 and not moving0[frames[0]["depth"] > 4.8].any()
    static = warp_abs_rel(
        frames[0]["depth"], frames[1]["depth"], K, *poses, frames[0]["mask"] & ~moving0, frames[1]["mask"] & ~moving1
    )
    moving = warp_abs_rel(frames[0]["depth"], frames[1]["depth"], K, *poses, moving0, frames[1]["mask"])
    static, moving = static[np.isfinite(static)], moving[np.isfinite(moving)]
    assert np.median(static) < 1e-6 and np.mean(static < 1e-3) > 0.9
    assert np.median(moving) > 0.03


def test_render_video_is_deterministic_and_well_formed():
    a = render_video(7, 2, 20, 28)
    b = render_video(7, 2, 20, 28)
    c = render_video(8, 2, 20, 28)
    assert a.keys() == {"frames", "depth", "mask", "dynamic", "K", "pose"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["frames"], c["frames"])
    assert a["frames"].dtype == np.uint8 and a["frames"].shape == (2, 20, 28, 3)
    assert a["depth"].dtype == np.float32 and a["pose"].shape == (2, 4, 4) and a["K"].shape == (2, 3, 3)
    np.testing.assert_array_equal(a["mask"], a["depth"] > 0)
    rotation = a["pose"][:, :3, :3].astype(float)
    np.testing.assert_allclose(rotation @ rotation.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="scene_kind"):
        render_video(0, 1, 8, 8, scene_kind="cave")
