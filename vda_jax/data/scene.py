"""Procedural scenes for the synthetic renderer: primitives, materials, motion, camera paths.

World frame: y points up, the ground/floor is the plane y = 0. Cameras follow the OpenCV
convention (x right, y down, z forward); poses are camera-to-world [4, 4].

Everything that moves is a sum of a linear drift and sinusoids of time (seconds), so
positions, orientations and the camera are smooth and can be evaluated at any t.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Texture kinds.
CHECKER, STRIPES, NOISE = 0, 1, 2
# Seconds between consecutive frames.
FRAME_DT = 0.1

_UP = np.array([0.0, 1.0, 0.0])


def concat(parts: list):
    """Concatenates dataclasses of per-object arrays (Materials, Motion) object-wise."""
    cls = type(parts[0])
    return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))


def take(rows, keep: np.ndarray):
    """The objects selected by ``keep`` (bool mask or indices) of a dataclass of per-object arrays."""
    return type(rows)(*(getattr(rows, f.name)[keep] for f in dataclasses.fields(rows)))


@dataclasses.dataclass(frozen=True)
class Materials:
    """Procedural solid textures, one row per primitive.

    Attributes:
      kind: [N] CHECKER, STRIPES or NOISE.
      scale: [N] feature size in metres.
      color_a, color_b: [N, 3] linear RGB in [0, 1], mixed by the pattern.
      direction: [N, 3] unit vector across the stripes.
      offset: [N, 3] shift of the pattern, in pattern cells (decorrelates the noise).
    """

    kind: np.ndarray
    scale: np.ndarray
    color_a: np.ndarray
    color_b: np.ndarray
    direction: np.ndarray
    offset: np.ndarray


@dataclasses.dataclass(frozen=True)
class Primitives:
    """The geometry at one instant, in world coordinates.

    Primitive i of the scene is plane i for i < P, then the spheres, then the boxes; ``materials``
    and ``dynamic`` follow that order.

    Attributes:
      plane_normal: [P, 3] unit normals; the plane holds the points x with n . x = offset.
      plane_offset: [P].
      sphere_center: [S, 3]; sphere_radius: [S]; sphere_rotation: [S, 3, 3] object-to-world.
      box_center: [B, 3]; box_rotation: [B, 3, 3] object-to-world; box_half: [B, 3] half sizes.
      materials: textures of the P + S + B primitives.
      dynamic: [P + S + B] bool, True for primitives that move.
    """

    plane_normal: np.ndarray
    plane_offset: np.ndarray
    sphere_center: np.ndarray
    sphere_radius: np.ndarray
    sphere_rotation: np.ndarray
    box_center: np.ndarray
    box_rotation: np.ndarray
    box_half: np.ndarray
    materials: Materials
    dynamic: np.ndarray


@dataclasses.dataclass(frozen=True)
class Motion:
    """Smooth motion of M objects: x(t) = x0 + velocity t + amplitude sin(omega t + phase).

    Attributes:
      velocity: [M, 3] m/s.
      amplitude: [M, 3] m.
      omega: [M] rad/s.
      phase: [M] rad.
      spin: [M] yaw rate about the world up axis, rad/s.
    """

    velocity: np.ndarray
    amplitude: np.ndarray
    omega: np.ndarray
    phase: np.ndarray
    spin: np.ndarray

    @staticmethod
    def still(m: int) -> Motion:
        return Motion(np.zeros((m, 3)), np.zeros((m, 3)), np.zeros(m), np.zeros(m), np.zeros(m))

    @property
    def moving(self) -> np.ndarray:
        """[M] bool."""
        return (np.abs(self.velocity).sum(-1) + np.abs(self.amplitude).sum(-1) + np.abs(self.spin)) > 0

    def offset(self, t: float) -> np.ndarray:
        """[M, 3] displacement at time t."""
        return self.velocity * t + self.amplitude * np.sin(self.omega * t + self.phase)[:, None]

    def extent(self, duration: float) -> np.ndarray:
        """[M] bound on the distance travelled from the start position within ``duration``."""
        return np.linalg.norm(self.velocity, axis=-1) * duration + 2 * np.linalg.norm(self.amplitude, axis=-1)


def yaw_matrix(yaw: np.ndarray) -> np.ndarray:
    """[..., 3, 3] rotations by ``yaw`` (rad) about the world up axis."""
    c, s = np.cos(yaw), np.sin(yaw)
    z, o = np.zeros_like(yaw), np.ones_like(yaw)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene over time: static planes, moving spheres and boxes, lighting and sky.

    Attributes:
      plane_normal, plane_offset: [P, 3], [P] static planes.
      sphere_center, sphere_radius: [S, 3], [S] at t = 0; sphere_motion over S.
      box_center, box_half, box_yaw: [B, 3], [B, 3], [B] at t = 0; box_motion over B.
      materials: textures of the P + S + B primitives (planes, spheres, boxes).
      light: [3] unit vector towards the directional light; ambient: its unlit share.
      sky_top, sky_horizon: [3] sky colours.
      far: hits farther than this (ray length, metres) are sky: invalid depth.
      fog: distance over which colours fade to the horizon colour (inf = none).
    """

    plane_normal: np.ndarray
    plane_offset: np.ndarray
    sphere_center: np.ndarray
    sphere_radius: np.ndarray
    sphere_motion: Motion
    box_center: np.ndarray
    box_half: np.ndarray
    box_yaw: np.ndarray
    box_motion: Motion
    materials: Materials
    light: np.ndarray
    ambient: float
    sky_top: np.ndarray
    sky_horizon: np.ndarray
    far: float = np.inf
    fog: float = np.inf

    def at(self, t: float) -> Primitives:
        """The primitives at time t (seconds)."""
        sphere_spin = yaw_matrix(self.sphere_motion.spin * t)
        box_rotation = yaw_matrix(self.box_yaw + self.box_motion.spin * t)
        dynamic = np.concatenate(
            [np.zeros(len(self.plane_offset), bool), self.sphere_motion.moving, self.box_motion.moving]
        )
        return Primitives(
            plane_normal=self.plane_normal,
            plane_offset=self.plane_offset,
            sphere_center=self.sphere_center + self.sphere_motion.offset(t),
            sphere_radius=self.sphere_radius,
            sphere_rotation=sphere_spin,
            box_center=self.box_center + self.box_motion.offset(t),
            box_rotation=box_rotation,
            box_half=self.box_half,
            materials=self.materials,
            dynamic=dynamic,
        )


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world [4, 4] of a camera at ``eye`` looking at ``target``, OpenCV axes, y-up world."""
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, _UP)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x, y, z], axis=1)
    pose[:3, 3] = eye
    return pose


@dataclasses.dataclass(frozen=True)
class CameraPath:
    """A smooth camera trajectory: eye and viewing direction as drift + sums of sinusoids.

    eye(t) = eye0 + velocity t + sum_k amplitude_k sin(omega_k t + phase_k), per axis;
    yaw(t), pitch(t) likewise (scalars). The camera looks at eye(t) + forward(yaw, pitch).

    Attributes:
      eye0, velocity: [3].
      amplitude, phase: [K, 3]; omega: [K].
      yaw0, yaw_rate, pitch0: scalars (rad, rad/s, rad).
      angle_amplitude, angle_phase: [K, 2] (yaw, pitch); angle_omega: [K].
      fov: horizontal field of view (rad) of the wider image side.
      principal_offset: [2] principal point offset from the centre, as a fraction of the size.
    """

    eye0: np.ndarray
    velocity: np.ndarray
    amplitude: np.ndarray
    omega: np.ndarray
    phase: np.ndarray
    yaw0: float
    yaw_rate: float
    pitch0: float
    angle_amplitude: np.ndarray
    angle_omega: np.ndarray
    angle_phase: np.ndarray
    fov: float
    principal_offset: np.ndarray

    def eye(self, t: float) -> np.ndarray:
        wave = self.amplitude * np.sin(self.omega[:, None] * t + self.phase)
        return self.eye0 + self.velocity * t + wave.sum(0)

    def pose(self, t: float) -> np.ndarray:
        """Camera-to-world [4, 4] at time t."""
        yaw, pitch = (self.angle_amplitude * np.sin(self.angle_omega[:, None] * t + self.angle_phase)).sum(0)
        yaw += self.yaw0 + self.yaw_rate * t
        pitch += self.pitch0
        forward = np.array([np.cos(pitch) * np.sin(yaw), np.sin(pitch), np.cos(pitch) * np.cos(yaw)])
        eye = self.eye(t)
        return look_at(eye, eye + forward)

    def intrinsics(self, height: int, width: int) -> np.ndarray:
        """K [3, 3] for an image of height x width; pixel centres at integer coordinates."""
        f = 0.5 * max(height, width) / np.tan(0.5 * self.fov)
        cx = (width - 1) / 2 + self.principal_offset[0] * width
        cy = (height - 1) / 2 + self.principal_offset[1] * height
        return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])


# ----------------------------------------------------------------------------- sampling


def _colors(rng: np.random.Generator, n: int, low: float = 0.1, high: float = 0.9) -> np.ndarray:
    """[n, 3] random colours: a random hue mixed with grey for moderate saturation."""
    base = rng.uniform(low, high, (n, 1))
    tint = rng.uniform(low, high, (n, 3))
    return np.clip(base + rng.uniform(0.3, 0.8, (n, 1)) * (tint - base), 0, 1)


def sample_materials(
    rng: np.random.Generator, n: int, scale: tuple[float, float], kinds: tuple[int, ...] = (CHECKER, STRIPES, NOISE)
) -> Materials:
    """Random textures for n primitives; feature sizes log-uniform in ``scale`` (metres)."""
    a = _colors(rng, n)
    # The second colour contrasts with the first in brightness so the pattern is always visible.
    b = np.clip(a * rng.uniform(0.25, 0.6, (n, 1)) + rng.uniform(-0.1, 0.1, (n, 3)), 0, 1)
    swap = rng.random(n) < 0.5
    a[swap], b[swap] = b[swap].copy(), a[swap].copy()
    direction = rng.normal(size=(n, 3))
    return Materials(
        kind=rng.choice(kinds, n).astype(np.int32),
        scale=np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]), n)),
        color_a=a,
        color_b=b,
        direction=direction / np.linalg.norm(direction, axis=-1, keepdims=True),
        offset=rng.uniform(0, 64, (n, 3)),
    )


def _random_motion(
    rng: np.random.Generator, moving: np.ndarray, speed: float, amplitude: float, horizontal: bool = False
) -> Motion:
    """Random drift (up to ``speed``), sway and spin of the objects where ``moving`` [M]; others stay."""
    m = len(moving)
    keep = moving.astype(float)[:, None]
    axes = np.array([1.0, 0.0 if horizontal else 0.5, 1.0])
    direction = rng.normal(size=(m, 3)) * axes
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True) + 1e-9
    return Motion(
        velocity=keep * direction * rng.uniform(0, speed, (m, 1)),
        amplitude=keep * rng.normal(size=(m, 3)) * axes * amplitude,
        omega=rng.uniform(0.5, 2.0, m),
        phase=rng.uniform(0, 2 * np.pi, m),
        spin=keep[:, 0] * rng.uniform(-1.0, 1.0, m),
    )


def _sky_and_light(rng: np.random.Generator) -> dict:
    elevation, azimuth = rng.uniform(0.5, 1.3), rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(elevation) * np.sin(azimuth), np.sin(elevation), np.cos(elevation) * np.cos(azimuth)])
    top = np.array([0.25, 0.45, 0.85]) + rng.uniform(-0.1, 0.1, 3)
    horizon = np.array([0.75, 0.8, 0.9]) + rng.uniform(-0.1, 0.1, 3)
    return dict(
        light=light,
        ambient=float(rng.uniform(0.25, 0.45)),
        sky_top=np.clip(top, 0, 1),
        sky_horizon=np.clip(horizon, 0, 1),
    )


def _camera_wave(rng: np.random.Generator, n: int, amplitude: np.ndarray, speed: float):
    """Sinusoids whose summed amplitude stays within ``amplitude`` [3]."""
    share = rng.dirichlet(np.ones(n), 3).T  # [n, 3], columns sum to 1
    omega = rng.uniform(0.2, 1.0, n) * speed
    return amplitude * share, omega, rng.uniform(0, 2 * np.pi, (n, 3))


def _angles(rng: np.random.Generator, n: int, yaw: float, pitch: float):
    share = rng.dirichlet(np.ones(n), 2).T
    return (share * np.array([yaw, pitch]), rng.uniform(0.2, 1.0, n), rng.uniform(0, 2 * np.pi, (n, 2)))


def _box_distance(points: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[M] Euclidean distance from points [M, 3] to the axis-aligned box [low, high]."""
    return np.linalg.norm(np.maximum(np.maximum(low - points, points - high), 0), axis=-1)


def sample_room(rng: np.random.Generator, duration: float) -> tuple[Scene, CameraPath]:
    """A room seen from near one wall: textured walls, furniture boxes, balls and movers."""
    half_x, height, half_z = rng.uniform(2, 4.5), rng.uniform(2.4, 3.6), rng.uniform(2.5, 5)
    normals = np.array([[0, 1, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1]], float)
    offsets = np.array([0.0, -height, -half_x, -half_x, -half_z, -half_z])

    # The camera stays in a region by the z = -half_z wall and looks into the room (+z).
    cam_low = np.array([-0.3 * half_x, 1.1, -half_z + 0.5])
    cam_high = np.array([0.3 * half_x, min(1.8, height - 0.5), -half_z + 0.5 + 0.4 * half_z])

    n_boxes, n_spheres = rng.integers(3, 9), rng.integers(2, 6)
    box_half = np.stack(
        [rng.uniform(0.2, 0.8, n_boxes), rng.uniform(0.15, 0.9, n_boxes), rng.uniform(0.2, 0.8, n_boxes)], -1
    )
    box_center = np.stack(
        [rng.uniform(-half_x, half_x, n_boxes), box_half[:, 1], rng.uniform(cam_high[2], half_z, n_boxes)], -1
    )
    sphere_radius = rng.uniform(0.15, 0.5, n_spheres)
    sphere_center = np.stack(
        [
            rng.uniform(-half_x, half_x, n_spheres),
            np.maximum(sphere_radius, rng.uniform(0, height * 0.7, n_spheres)),
            rng.uniform(cam_high[2], half_z, n_spheres),
        ],
        -1,
    )
    # The first sphere always moves, in view: a few metres ahead of the camera.
    sphere_center[0, [0, 2]] = rng.uniform(-1, 1), cam_high[2] + rng.uniform(1.0, 3.0)
    box_motion = _random_motion(rng, rng.random(n_boxes) < 0.3, speed=0.4, amplitude=0.3, horizontal=True)
    sphere_motion = _random_motion(
        rng, (np.arange(n_spheres) == 0) | (rng.random(n_spheres) < 0.4), speed=0.5, amplitude=0.4
    )

    margin = 0.4  # keeps every object off the camera's near range
    keep_boxes = (
        _box_distance(box_center, cam_low, cam_high)
        > np.linalg.norm(box_half, axis=-1) + box_motion.extent(duration) + margin
    )
    keep_spheres = (
        _box_distance(sphere_center, cam_low, cam_high) > sphere_radius + sphere_motion.extent(duration) + margin
    )
    materials = concat(
        [
            sample_materials(rng, 6, (0.2, 1.0)),
            sample_materials(rng, int(keep_spheres.sum()), (0.05, 0.3)),
            sample_materials(rng, int(keep_boxes.sum()), (0.05, 0.4)),
        ]
    )
    scene = Scene(
        plane_normal=normals,
        plane_offset=offsets,
        sphere_center=sphere_center[keep_spheres],
        sphere_radius=sphere_radius[keep_spheres],
        sphere_motion=take(sphere_motion, keep_spheres),
        box_center=box_center[keep_boxes],
        box_half=box_half[keep_boxes],
        box_yaw=rng.uniform(0, np.pi, n_boxes)[keep_boxes],
        box_motion=take(box_motion, keep_boxes),
        materials=materials,
        **_sky_and_light(rng),
    )

    amplitude, omega, phase = _camera_wave(rng, 3, (cam_high - cam_low) / 2, speed=1.0)
    angle_amplitude, angle_omega, angle_phase = _angles(rng, 3, yaw=0.6, pitch=0.15)
    path = CameraPath(
        eye0=(cam_low + cam_high) / 2,
        velocity=np.zeros(3),
        amplitude=amplitude,
        omega=omega,
        phase=phase,
        yaw0=rng.normal(0, 0.3),
        yaw_rate=rng.uniform(-0.1, 0.1),
        pitch0=rng.uniform(-0.4, -0.05),
        angle_amplitude=angle_amplitude,
        angle_omega=angle_omega,
        angle_phase=angle_phase,
        fov=rng.uniform(np.radians(55), np.radians(85)),
        principal_offset=rng.uniform(-0.02, 0.02, 2),
    )
    return scene, path


def sample_outdoor(rng: np.random.Generator, duration: float) -> tuple[Scene, CameraPath]:
    """A street: ground plane, buildings on both sides, trees, moving cars and balls, sky."""
    speed = rng.uniform(2.0, 8.0)
    travel = speed * duration
    road = rng.uniform(4.0, 7.0)  # half width of the free corridor around x = 0
    far = rng.uniform(80.0, 150.0)

    n_buildings = rng.integers(8, 20)
    side = rng.choice([-1.0, 1.0], n_buildings)
    b_half = np.stack(
        [rng.uniform(2, 6, n_buildings), rng.uniform(2, 12, n_buildings), rng.uniform(2, 8, n_buildings)], -1
    )
    b_center = np.stack(
        [
            side * (road + b_half[:, 0] + rng.uniform(0, 6, n_buildings)),
            b_half[:, 1],
            rng.uniform(-10, travel + far * 0.7, n_buildings),
        ],
        -1,
    )
    b_yaw = rng.normal(0, 0.1, n_buildings)

    n_cars = rng.integers(1, 5)
    lane = rng.choice([-1.0, 1.0], n_cars) * rng.uniform(2.0, road - 1.0, n_cars)
    c_half = np.stack([rng.uniform(0.8, 1.0, n_cars), rng.uniform(0.6, 0.9, n_cars), rng.uniform(1.8, 2.4, n_cars)], -1)
    c_center = np.stack([lane, c_half[:, 1], rng.uniform(5, 40, n_cars)], -1)
    car_velocity = np.zeros((n_cars, 3))
    car_velocity[:, 2] = rng.uniform(-8, 12, n_cars)  # along the road, either way
    car_motion = dataclasses.replace(Motion.still(n_cars), velocity=car_velocity)

    n_trees, n_balls = rng.integers(2, 10), rng.integers(0, 4)
    t_radius = rng.uniform(1.0, 2.5, n_trees)
    t_center = np.stack(
        [
            rng.choice([-1.0, 1.0], n_trees) * (road + rng.uniform(0, 2, n_trees)),
            t_radius + rng.uniform(1.0, 3.0, n_trees),
            rng.uniform(0, travel + far * 0.5, n_trees),
        ],
        -1,
    )
    trunk_width = rng.uniform(0.12, 0.3, n_trees)
    trunk_half = np.stack([trunk_width, t_center[:, 1] / 2, trunk_width], -1)
    trunk_center = t_center * np.array([1.0, 0.5, 1.0])
    ball_radius = rng.uniform(0.2, 0.6, n_balls)
    ball_center = np.stack(
        [rng.uniform(-road + 1.5, road - 1.5, n_balls), ball_radius + 0.8, rng.uniform(6, 30, n_balls)], -1
    )
    ball_motion = Motion(
        velocity=np.zeros((n_balls, 3)),
        amplitude=np.stack(
            [rng.uniform(-1, 1, n_balls), rng.uniform(0.3, 0.7, n_balls), rng.uniform(-1, 1, n_balls)], -1
        ),
        omega=rng.uniform(1.5, 3.0, n_balls),
        phase=rng.uniform(0, 2 * np.pi, n_balls),
        spin=rng.uniform(-2, 2, n_balls),
    )
    # Balls must stay clear of the camera corridor (|x| < 1, any z along the path).
    ball_keep = np.abs(ball_center[:, 0]) - ball_radius - np.abs(ball_motion.amplitude[:, 0]) > 1.2
    ball_center, ball_radius, ball_motion = ball_center[ball_keep], ball_radius[ball_keep], take(ball_motion, ball_keep)

    materials = concat(
        [
            sample_materials(rng, 1, (0.3, 2.0)),
            sample_materials(rng, n_trees, (0.2, 0.6), kinds=(NOISE,)),
            sample_materials(rng, len(ball_radius), (0.05, 0.2)),
            sample_materials(rng, n_buildings, (0.5, 3.0), kinds=(CHECKER, STRIPES)),
            sample_materials(rng, n_trees, (0.05, 0.2), kinds=(STRIPES, NOISE)),
            sample_materials(rng, n_cars, (0.1, 0.5)),
        ]
    )
    scene = Scene(
        plane_normal=np.array([[0.0, 1.0, 0.0]]),
        plane_offset=np.zeros(1),
        sphere_center=np.concatenate([t_center, ball_center]),
        sphere_radius=np.concatenate([t_radius, ball_radius]),
        sphere_motion=concat([Motion.still(n_trees), ball_motion]),
        box_center=np.concatenate([b_center, trunk_center, c_center]),
        box_half=np.concatenate([b_half, trunk_half, c_half]),
        box_yaw=np.concatenate([b_yaw, rng.uniform(0, np.pi, n_trees), np.zeros(n_cars)]),
        box_motion=concat([Motion.still(n_buildings + n_trees), car_motion]),
        materials=materials,
        far=far,
        fog=far * 0.7,
        **_sky_and_light(rng),
    )

    amplitude, omega, phase = _camera_wave(rng, 2, np.array([0.6, 0.15, 0.0]), speed=1.0)
    angle_amplitude, angle_omega, angle_phase = _angles(rng, 2, yaw=0.25, pitch=0.05)
    path = CameraPath(
        eye0=np.array([0.0, rng.uniform(1.2, 2.2), 0.0]),
        velocity=np.array([0.0, 0.0, speed]),
        amplitude=amplitude,
        omega=omega,
        phase=phase,
        yaw0=0.0,
        yaw_rate=0.0,
        pitch0=rng.uniform(-0.15, 0.02),
        angle_amplitude=angle_amplitude,
        angle_omega=angle_omega,
        angle_phase=angle_phase,
        fov=rng.uniform(np.radians(60), np.radians(90)),
        principal_offset=rng.uniform(-0.02, 0.02, 2),
    )
    return scene, path


SCENE_KINDS = {"room": sample_room, "outdoor": sample_outdoor}
