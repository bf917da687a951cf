"""The grain input pipeline and its clip transforms."""

import dataclasses
import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from vda_jax.data import builders, render, transforms
from vda_jax.data import scene as scene_lib
from vda_jax.data.pipeline import DataConfig, clip_index, make_dataset

NUM_VIDEOS, NUM_FRAMES, CLIP = 4, 6, 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    config = builders.SyntheticConfig(
        name="p", height=24, width=32, num_frames=NUM_FRAMES, num_videos=(NUM_VIDEOS, 0, 0), seed=1
    )
    builders.prepare(builders.VdaSynthetic, str(root), config=config)
    images = tmp_path_factory.mktemp("pseudo")
    rng = np.random.default_rng(0)
    for i in range(6):
        os.makedirs(images / "images", exist_ok=True)
        os.makedirs(images / "depth", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(images / f"images/{i}.png")
        np.save(images / f"depth/{i}.npy", rng.uniform(0.1, 1.0, (20, 30)).astype(np.float16))
    builders.prepare(
        builders.VdaPseudoLabels, str(root), config=builders.PseudoLabelConfig(name="p"), source_dir=str(images)
    )
    return str(root)


def config(data_dir, **overrides):
    base = dict(
        video_dataset="vda_synthetic/p",
        image_dataset="vda_pseudo_labels/p",
        data_dir=data_dir,
        clip_frames=CLIP,
        crop_size=(14, 28),
        batch_size=2,
        image_batch_size=3,
        read_threads=2,
    )
    return DataConfig(**{**base, **overrides})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_clip_index():
    np.testing.assert_array_equal(clip_index([5, 2, 7], 3, 2, 1), [[0, 2, 4], [7, 9, 11], [8, 10, 12], [9, 11, 13]])
    np.testing.assert_array_equal(clip_index([6], 2, 1, 3), [[0, 1], [3, 4]])


def test_batches_mix_videos_and_images(data_dir):
    batches = take(iter(make_dataset(config(data_dir, image_ratio=0.5), grain.sharding.NoSharding())), 8)
    kinds = [b["kind"] for b in batches]
    assert kinds.count("video") == kinds.count("image") == 4
    for b in batches:
        batch, t = (2, CLIP) if b["kind"] == "video" else (3, 1)
        assert b["frames"].shape == (batch, t, 14, 28, 3) and b["frames"].dtype == np.uint8
        assert b["depth"].shape == b["mask"].shape == (batch, t, 14, 28) and b["depth"].dtype == np.float32
        assert b["K"].shape == (batch, t, 3, 3) and b["pose"].shape == (batch, t, 4, 4)
        np.testing.assert_array_equal(b["mask"], b["depth"] > 0)
        # The images have no cameras; a clip's frames share one crop, so one K.
        assert np.isnan(b["K"]).all() == (b["kind"] == "image")
        if b["kind"] == "video":
            np.testing.assert_array_equal(b["K"], np.broadcast_to(b["K"][:, :1], b["K"].shape))
            np.testing.assert_array_equal(b["frame"], b["frame"][:, :1] + np.arange(CLIP))


def test_same_seed_same_batches(data_dir):
    cfg = config(data_dir, image_ratio=0.3)
    first = take(iter(make_dataset(cfg, grain.sharding.NoSharding())), 5)
    assert_same_batches(first, take(iter(make_dataset(cfg, grain.sharding.NoSharding())), 5))
    other = take(iter(make_dataset(dataclasses.replace(cfg, seed=1), grain.sharding.NoSharding())), 5)
    assert any(not np.array_equal(a["frames"], b["frames"]) for a, b in zip(first, other))


def test_restored_state_continues_with_the_same_batches(data_dir, tmp_path):
    cfg = config(data_dir, image_ratio=0.3)
    iterator = iter(make_dataset(cfg, grain.sharding.NoSharding()))
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 3)
    resumed = iter(make_dataset(cfg, grain.sharding.NoSharding()))  # e.g. after a restart
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), expected)

    # The position is one number, the same on every process: checkpoints store it as JSON.
    assert json.loads(json.dumps(state)) == state


def test_row_blocks_make_the_same_global_batches(data_dir):
    # 1 process reading whole batches or 2 reading half of each: the same global batches.
    cfg = config(data_dir, num_epochs=1, batch_size=4)
    whole = list(make_dataset(cfg, grain.sharding.NoSharding()))
    halves = [list(make_dataset(cfg, grain.sharding.ShardOptions(i, 2))) for i in range(2)]
    assert len(whole) == len(halves[0]) == len(halves[1]) == NUM_VIDEOS * (NUM_FRAMES - CLIP + 1) // 4
    for batch, first, second in zip(whole, *halves):
        for key in ("frames", "depth", "mask", "video", "frame"):
            np.testing.assert_array_equal(batch[key], np.concatenate([first[key], second[key]]))
    clips = [(int(v), int(f)) for b in whole for v, f in zip(b["video"], b["frame"][:, 0])]
    assert len(set(clips)) == len(clips)  # each clip at most once per epoch

    mixed = config(data_dir, image_ratio=0.5, batch_size=4, image_batch_size=4)
    whole = take(iter(make_dataset(mixed, grain.sharding.NoSharding())), 6)
    halves = [take(iter(make_dataset(mixed, grain.sharding.ShardOptions(i, 2))), 6) for i in range(2)]
    for batch, first, second in zip(whole, *halves):
        assert batch["kind"] == first["kind"] == second["kind"]
        np.testing.assert_array_equal(batch["frames"], np.concatenate([first["frames"], second["frames"]]))


def test_one_row_batches_are_the_rows_of_the_bigger_ones(data_dir):
    # Batches of one clip (one process, or a batch of 2 over 2 processes) of the endless stream.
    pairs = take(iter(make_dataset(config(data_dir), grain.sharding.NoSharding())), 2)
    single = take(iter(make_dataset(config(data_dir, batch_size=1), grain.sharding.NoSharding())), 4)
    halves = [take(iter(make_dataset(config(data_dir), grain.sharding.ShardOptions(i, 2))), 2) for i in range(2)]
    for key in ("frames", "depth", "video", "frame"):
        for k, pair in enumerate(pairs):
            np.testing.assert_array_equal(pair[key], np.concatenate([single[2 * k][key], single[2 * k + 1][key]]))
            np.testing.assert_array_equal(pair[key], np.concatenate([halves[0][k][key], halves[1][k][key]]))


def test_config_validation():
    with pytest.raises(ValueError, match="multiples of 14"):
        DataConfig(crop_size=(20, 28))
    with pytest.raises(ValueError, match="needs an image_dataset"):
        DataConfig(image_ratio=0.5)
    for field, value, rule in [("flip_prob", -0.1, r"in \[0, 1\]"), ("color_jitter", -1.0, r">= 0 \(0: off\)"),
                               ("read_threads", 0, ">= 1"), ("prefetch_batches", -1, ">= 0")]:
        with pytest.raises(ValueError, match=f"^invalid DataConfig: {field} must be {rule}, got {value}$"):
            DataConfig(**{field: value})
    DataConfig(flip_prob=0.0, color_jitter=0.0, read_threads=1, prefetch_batches=0)  # the edges are allowed


def test_crop_resize_and_flip_keep_the_geometry():
    """A transformed render equals a render with the transformed camera.

    Shrinking by an odd integer factor makes the nearest sample of each output pixel the source
    pixel with the same centre, so depth must match exactly.
    """
    rng = np.random.default_rng(0)
    scene, path = scene_lib.sample_room(rng, 1.0)
    K, pose = path.intrinsics(42, 63), path.pose(0.0)
    frame = render.render_frame(scene, 0.0, K, pose, 42, 63)
    clip = {
        "frames": np.round(frame["rgb"][None] * 255).astype(np.uint8),
        "depth": frame["depth"][None],
        "mask": frame["mask"][None],
        "K": K[None],
        "pose": pose[None],
    }
    for flip in (False, True):
        out = transforms.resize_crop(clip, size=(14, 21), offset=(2, 3), crop=(10, 14), flip=flip)
        direct = render.render_frame(scene, 0.0, out["K"][0], out["pose"][0], 10, 14)
        np.testing.assert_allclose(out["depth"][0], direct["depth"], rtol=1e-5)
        np.testing.assert_array_equal(out["mask"][0], direct["mask"])
        assert out["frames"].shape == (1, 10, 14, 3)


def test_jitter_table_is_a_monotone_lookup_per_channel():
    table = np.array(transforms.jitter_table(np.random.default_rng(0), 0.3)).reshape(3, 256)
    assert (np.diff(table, axis=1) >= 0).all() and (table[:, 255] > table[:, 0]).all()
    assert not (table == np.arange(256)).all()
    frames = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    clip = {
        "frames": frames,
        "depth": np.ones((2, 8, 8), np.float32),
        "mask": np.ones((2, 8, 8), bool),
        "K": np.eye(3)[None].repeat(2, 0),
        "pose": np.eye(4)[None].repeat(2, 0),
    }
    out = transforms.resize_crop(clip, (8, 8), (0, 0), (8, 8), color_table=table.ravel().tolist())
    np.testing.assert_array_equal(out["frames"], np.stack([table[c][frames[..., c]] for c in range(3)], -1))
