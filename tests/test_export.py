"""Deployment export: the official layout round trip, ONNX and StableHLO artefacts, and the JAX-free runtime."""

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile

import imageio.v3 as iio
import jax
import numpy as np
import onnx
import pytest
import safetensors.numpy
from vda_jax.convert.readers import read_checkpoint

from vda_jax import cli
from vda_jax.checkpoint import read_config
from vda_jax.export import exporter
from vda_jax.export.exporter import ExportOptions, checkpoint_hash, export_checkpoint
from vda_jax.inference import stream
from vda_jax.runtime.metadata import EXPORT_VERSION
from vda_jax.runtime.model import ExportedModel
from vda_jax.runtime.preprocess import preprocess, resize_depth

CASES = {"n75_72x96_s70": "clip70", "n20_72x96_s70": "clip70", "n54_64x64_s56": "clip56"}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_round_trip_is_bit_identical(tiny_model_dir, fixtures, tmp_path, suffix):
    out = tmp_path / f"back{suffix}"
    assert cli.main(["export", str(tiny_model_dir), str(out), "--format", "official"]) == 0
    original, back = read_checkpoint(fixtures / "tiny.pth"), read_checkpoint(out)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert (back[key].dtype, back[key].shape) == (value.dtype, value.shape), key
        assert back[key].tobytes() == value.tobytes(), key
    if suffix == ".safetensors":  # the reference reader agrees
        reference = safetensors.numpy.load_file(out)
        assert all(reference[k].tobytes() == v.tobytes() for k, v in original.items())
    else:  # storages are 64-byte aligned, as torch writes them (for memory-mapped loading)
        raw = out.read_bytes()
        for info in zipfile.ZipFile(out).infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_export_refuses_bad_input(tiny_model_dir, tmp_path, capsys):
    cases = [
        (["--height", "60", "--width", "98"], "--height 60 must be a positive multiple of 14"),
        (["--height", "70"], "give both --height and --width"),
        (["--format", "official", "--streaming"], "official writes the float32 parameters only"),
        (["--precision", "fp16"], "ONNX export is float32 only"),
    ]
    for flags, message in cases:
        out = tmp_path / ("m.pth" if "official" in flags else "m.onnx")
        assert cli.main(["export", str(tiny_model_dir), str(out), *flags]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not os.listdir(tmp_path)
    assert cli.main(["export", str(tiny_model_dir), str(tmp_path / "m.bin"), "--format", "official"]) == 1
    assert "end in .pth or .safetensors" in capsys.readouterr().err and not os.listdir(tmp_path)
    # Checked before the work, naming the user's file (not a hidden temporary one).
    for output, flags, message in [
            ("x.bin", ["--format", "official"], f"--format official output {tmp_path / 'x.bin'} must end in .pth "
                                                "or .safetensors"),
            ("x.onnx", ["--format", "official"], f"--format official output {tmp_path / 'x.onnx'} is named like a "
                                                 "--format onnx file; pass --format onnx, or end the name in .pth or "
                                                 ".safetensors"),
            ("x.stablehlo", [], f"--format onnx output {tmp_path / 'x.stablehlo'} is named like a --format stablehlo "
                                "file; pass --format stablehlo, or end the name in .onnx"),
            ("", [], f"--format onnx output {tmp_path} is a folder; name a file in it"),
            ("x.onnx", ["--streaming", "--frames", "8"], "--frames sets the clip model's length; a streaming model "
                                                         "takes one frame at a time: drop --frames")]:
        assert cli.main(["export", str(tiny_model_dir), str(tmp_path / output), *flags]) == 1
        assert capsys.readouterr().err == f"vda-jax export: error: {message}\n"
        assert not os.listdir(tmp_path)
    (tmp_path / "m.stablehlo").write_bytes(b"")
    assert cli.main(["export", str(tiny_model_dir), str(tmp_path / "m.stablehlo"), "--format", "stablehlo"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_stablehlo_clip_matches_official_forward_with_dynamic_batch(tiny_model_dir, fixtures, tmp_path):
    recorded = np.load(fixtures / "tiny_forward.npz")
    x, expected = recorded["x"].transpose(0, 1, 3, 4, 2), recorded["depth"]  # [1, 6, 98, 126, 3], [1, 6, 98, 126]
    out = str(tmp_path / "clip.stablehlo")
    meta = export_checkpoint(str(tiny_model_dir), out, ExportOptions(format="stablehlo", frames=6, height=98,
                                                                      width=126))
    with open(tmp_path / "clip.stablehlo.json") as f:
        assert json.load(f) == meta
    assert meta["inputs"] == [{"name": "frames", "shape": ["batch", 6, 98, 126, 3], "dtype": "float32"}]
    assert meta["outputs"] == [{"name": "depth", "shape": ["batch", 6, 98, 126], "dtype": "float32"}]
    assert meta["depth"] == "relative" and meta["network_size"] == [98, 126] and meta["input_size"] == 98
    assert meta["source_checkpoint"]["sha256"] == checkpoint_hash(str(tiny_model_dir))
    with open(out, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    for batch in (x, np.concatenate([x, x])):
        depth = np.asarray(exported.call(batch))
        assert depth.shape == (len(batch), *expected.shape[1:])
        assert np.abs(depth - expected).max() <= 1e-4 * np.abs(expected).max()


def test_stablehlo_stream_matches_official_stream(tiny_model_dir, fixtures, tmp_path):
    recorded = np.load(fixtures / "tiny_stream.npz")
    frames, expected = recorded["frames"][:6], recorded["depth"][:6]
    out = str(tmp_path / "stream.stablehlo")
    meta = export_checkpoint(str(tiny_model_dir), out, ExportOptions(format="stablehlo", height=70, width=98,
                                                                      streaming=True))
    assert [i["name"] for i in meta["inputs"]] == ["frame", "step", *(f"ring_{i}" for i in range(16))]
    assert meta["inputs"][2]["shape"][:2] == [1, stream.RING_SLOTS]
    with open(out, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    state = [np.zeros((), np.int32)] + [np.zeros(i["shape"], i["dtype"]) for i in meta["inputs"][2:]]
    for frame, want in zip(frames, expected):
        depth, *state = exported.call(preprocess(frame[None], (70, 98)), *state)
        got = resize_depth(np.asarray(depth[0]), frame.shape[:2])
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert int(state[0]) == len(frames)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def onnx_models(tiny_model_dir, tmp_path_factory):
    """The tiny model exported to ONNX: clips at the fixtures' two network sizes and the streaming step; beside
    clip56.onnx a StableHLO export of the same stem (the README's naming); the warnings logged meanwhile."""
    out = tmp_path_factory.mktemp("onnx")
    paths = {"clip70": str(out / "clip70.onnx"), "clip56": str(out / "clip56.onnx"),
             "stream70": str(out / "stream70.onnx")}
    warnings = _Records()
    logging.getLogger().addHandler(warnings)
    try:
        assert cli.main(["export", str(tiny_model_dir), paths["clip70"], "--height", "70", "--width", "98"]) == 0
        export_checkpoint(str(tiny_model_dir), paths["clip56"], ExportOptions(height=56, width=56))
        export_checkpoint(str(tiny_model_dir), paths["stream70"], ExportOptions(height=70, width=98, streaming=True))
    finally:
        logging.getLogger().removeHandler(warnings)
    assert cli.main(["export", str(tiny_model_dir), str(out / "clip56.stablehlo"), "--format", "stablehlo",
                     "--height", "56", "--width", "56", "--frames", "2"]) == 0
    return {**paths, "warnings": [r.getMessage() for r in warnings.records]}


def test_onnx_export_is_quiet_and_names_the_batch_axis_b(onnx_models):
    assert onnx_models["warnings"] == []  # onnx_ir warned once per untyped shape constant (128 for the demo model)
    for name in ("clip70", "clip56"):
        graph = onnx.load(onnx_models[name], load_external_data=False).graph
        assert [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.output] == \
            [["B", 32, *[d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][2:4]]]


def test_onnx_and_stablehlo_of_one_stem_keep_their_own_json(onnx_models):
    onnx_path = onnx_models["clip56"]
    stablehlo_path = onnx_path.replace(".onnx", ".stablehlo")
    for path, artifact in ((onnx_path, "onnx"), (stablehlo_path, "stablehlo")):
        with open(path + ".json") as f:
            meta = json.load(f)
        assert (meta["artifact"], meta["version"]) == (artifact, EXPORT_VERSION)
    assert not os.path.exists(onnx_path.replace(".onnx", ".json"))
    assert ExportedModel(onnx_path).meta["window"]["frames"] == 32


def test_runtime_reads_version_1_exports_and_refuses_what_it_cannot_run(onnx_models, tmp_path):
    """Version 1 wrote OUT.json beside OUT.onnx (shared by OUT.stablehlo); a newer version is refused."""
    with open(onnx_models["clip56"] + ".json") as f:
        meta = json.load(f)
    shutil.copy(onnx_models["clip56"], tmp_path / "old.onnx")
    (tmp_path / "old.json").write_text(json.dumps({**meta, "version": 1}))
    frames = np.random.default_rng(0).normal(size=(1, 32, 56, 56, 3)).astype(np.float32)
    np.testing.assert_array_equal(ExportedModel(str(tmp_path / "old.onnx"))(frames)[0],
                                  ExportedModel(onnx_models["clip56"])(frames)[0])
    cases = [("old.json", {**meta, "version": 1, "artifact": "stablehlo"},
              f"{tmp_path / 'old.json'} describes a stablehlo export, not old.onnx; export old.onnx again "
              "(version 1 exports of one file stem shared their JSON)"),
             ("old.onnx.json", {**meta, "version": EXPORT_VERSION + 1},
              f"{tmp_path / 'old.onnx.json'} is export version {EXPORT_VERSION + 1}, newer than this vda-jax reads "
              f"({EXPORT_VERSION}); upgrade vda-jax")]
    for name, content, message in cases:
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(ValueError) as info:
            ExportedModel(str(tmp_path / "old.onnx"))
        assert str(info.value) == message


def test_onnx_clip_batch_is_dynamic(onnx_models):
    model = ExportedModel(onnx_models["clip56"])
    frames = np.random.default_rng(0).normal(size=(2, 32, 56, 56, 3)).astype(np.float32)
    (both,) = model(frames)
    assert both.shape == (2, 32, 56, 56)
    for i in range(2):
        np.testing.assert_allclose(both[i:i + 1], model(frames[i:i + 1])[0], rtol=1e-5, atol=1e-5)


def test_onnx_weights_past_protobufs_limit_go_beside_the_model_all_or_nothing(onnx_models, tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    """vitg's weights pass protobuf's 2 GB: they go to OUT.onnx.data (here: the limit lowered to 0 bytes; the graph
    traced is the fixture's clip56 export, so only the writing runs again)."""
    onnx_module, _ = exporter._onnx_modules()
    monkeypatch.setattr(exporter, "_onnx_modules", lambda: (onnx_module, lambda *a, **k: onnx.load(
        onnx_models["clip56"])))
    monkeypatch.setattr(exporter, "_ONNX_INLINE_LIMIT", 0)
    options, out = ExportOptions(height=56, width=56), tmp_path / "big.onnx"
    save_model = onnx.save_model

    def cut_short(proto, path, **kwargs):  # the weights written, then the disk fills
        save_model(proto, path, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(onnx, "save_model", cut_short)
    with pytest.raises(OSError, match="No space"):
        export_checkpoint(str(tiny_model_dir), str(out), options)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    monkeypatch.setattr(onnx, "save_model", save_model)
    export_checkpoint(str(tiny_model_dir), str(out), options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "big.onnx.json"]
    assert (tmp_path / "big.onnx").stat().st_size < (tmp_path / "big.onnx.data").stat().st_size
    frames = np.random.default_rng(0).normal(size=(1, 32, 56, 56, 3)).astype(np.float32)
    np.testing.assert_array_equal(ExportedModel(str(out))(frames)[0], ExportedModel(onnx_models["clip56"])(frames)[0])


def test_onnx_clip_materialises_nothing_larger_than_an_activation(onnx_models, tiny_model_dir):
    """#25: jax2onnx exported the fused qkv and GEGLU projections' einsum by broadcasting the kernel over every
    token (``Expand`` to ``[N, tokens, in, parts, out]``: 1.6 GB per encoder block for vits at 126x182, 8 frames;
    onnxruntime ran out of memory at 280x378, 32 frames); here that gave 147 MB GEGLU broadcasts, the bound is 28 MB."""
    config, _ = read_config(str(tiny_model_dir))
    proto = onnx.load(onnx_models["clip70"])
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # one clip: every shape static
    del proto.graph.value_info[:]
    graph = onnx.shape_inference.infer_shapes(proto, data_prop=True, strict_mode=True).graph
    values = {v.name: v.type.tensor_type for v in (*graph.value_info, *graph.output)}
    sizes = {}
    for node in graph.node:
        for name in node.output:
            shape = [d.dim_value if d.HasField("dim_value") else None for d in values[name].shape.dim]
            assert None not in shape, (node.op_type, name, shape)
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(values[name].elem_type).itemsize
            sizes[f"{node.op_type} {name} {shape}"] = int(np.prod(shape)) * itemsize
    # The clip's largest float32 activations: the encoder's MLP hidden layer, its attention logits and the head's
    # output convolutions at the input size (max(features // 2, 32) channels), all frames at once.
    t, h, w = 32, 70, 98
    tokens = (h // config.patch_size) * (w // config.patch_size) + 1
    bound = 4 * t * max(tokens * int(config.mlp_ratio * config.embed_dim), config.num_heads * tokens**2,
                        h * w * max(config.features // 2, 32))
    assert max(sizes.values()) <= bound, sorted(sizes.items(), key=lambda item: -item[1])[:5]

_JAX_FREE_RUN = textwrap.dedent("""
    import json, sys

    class NoJax:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib", "flax"):
                raise ImportError(f"the runtime imported {name}")

    sys.meta_path.insert(0, NoJax())
    import numpy as np
    from vda_jax.runtime.model import infer_video_depth

    errors = {}
    for case, path, fixture, key in json.loads(sys.argv[1]):
        ref = np.load(fixture)
        size = int(ref[f"{key}input_size"])
        depth, expected = infer_video_depth(path, ref[f"{key}frames"], size), ref[f"{key}depth"]
        assert depth.shape == expected.shape and depth.dtype == np.float32, (depth.shape, depth.dtype)
        errors[case] = float(np.abs(depth - expected).max() / np.abs(expected).max())
    print(json.dumps(errors))
""")


def test_runtime_reproduces_the_official_pipelines_without_jax(onnx_models, fixtures):
    runs = [(case, onnx_models[model], str(fixtures / "tiny_video.npz"), f"{case}_") for case, model in CASES.items()]
    runs.append(("stream", onnx_models["stream70"], str(fixtures / "tiny_stream.npz"), ""))
    result = subprocess.run([sys.executable, "-c", _JAX_FREE_RUN, json.dumps(runs)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = json.loads(result.stdout.splitlines()[-1])
    assert sorted(errors) == sorted([*CASES, "stream"])
    assert all(e <= 1e-4 for e in errors.values()), errors


def test_runtime_refuses_frames_of_another_network_size(onnx_models):
    model = ExportedModel(onnx_models["clip56"])
    frames = np.zeros((3, 72, 96, 3), np.uint8)
    with pytest.raises(ValueError, match=r"need a 70x98 network input.*exported for 56x56.*--height 70 --width 98"):
        next(model.depth(frames, 70))


def test_infer_with_onnx_writes_the_official_depths(onnx_models, fixtures, tmp_path):
    ref = np.load(fixtures / "tiny_video.npz")
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(ref["n20_72x96_s70_frames"]):
        iio.imwrite(folder / f"{i:03d}.png", frame)
    out = tmp_path / "out"
    assert cli.main(["infer", str(folder), "--onnx", onnx_models["clip70"], "--output-dir", str(out), "--save-npz",
                     "--quiet"]) == 0
    depth, expected = np.load(out / "clip_depths.npz")["depths"], ref["n20_72x96_s70_depth"]
    assert depth.shape == expected.shape
    assert np.abs(depth - expected).max() <= 1e-4 * np.abs(expected).max()


def test_infer_with_onnx_refuses_options_the_model_cannot_honour(onnx_models, fixtures, tmp_path, capsys):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(np.load(fixtures / "tiny_video.npz")["n20_72x96_s70_frames"][:3]):
        iio.imwrite(folder / f"{i:03d}.png", frame)
    # A clip model of 16 frames (`export --frames 16`): its JSON says so.
    with open(onnx_models["clip70"] + ".json") as f:
        meta = json.load(f)
    meta["window"]["frames"] = meta["inputs"][0]["shape"][1] = meta["outputs"][0]["shape"][1] = 16
    shutil.copy(onnx_models["clip70"], tmp_path / "f16.onnx")
    (tmp_path / "f16.onnx.json").write_text(json.dumps(meta))
    clip = onnx_models["clip70"]
    cases = [
        ([clip, "--streaming"], "--streaming needs a streaming export, and clip70.onnx is a clip model; export one "
                                "with `vda-jax export CHECKPOINT OUT.onnx --streaming`, or drop --streaming"),
        ([clip, "--precision", "bf16"],
         "--precision bf16: clip70.onnx computes in fp32, as exported; drop --precision"),
        ([clip, "--batch-size", "2"], "--batch-size 2: the ONNX runtime runs one video at a time; drop --batch-size"),
        ([str(tmp_path / "f16.onnx")], "f16.onnx takes clips of 16 frames, but the long-video algorithm runs "
                                       "32-frame windows; export it again without --frames"),
        ([str(tiny_dir := os.path.dirname(clip))], f"{tiny_dir} is a folder; give the .onnx file that `vda-jax "
                                                  "export` wrote (a model directory goes to --checkpoint)"),
        ([clip.replace("clip70.onnx", "clip56.stablehlo")],
         f"{clip.replace('clip70.onnx', 'clip56.stablehlo')} is not a .onnx file; give the .onnx file that "
         "`vda-jax export` wrote"),
    ]
    out = tmp_path / "out"
    for (model, *flags), message in cases:
        assert cli.main(["infer", str(folder), "--onnx", model, *flags, "--output-dir", str(out), "--quiet"]) == 1
        assert capsys.readouterr().err == f"vda-jax infer: error: {message}\n", flags
        assert not out.exists()
    # A streaming model runs with --streaming as without.
    assert cli.main(["infer", str(folder), "--onnx", onnx_models["stream70"], "--streaming", "--output-dir", str(out),
                     "--save-npz", "--quiet"]) == 0
    assert np.load(out / "clip_depths.npz")["depths"].shape == (3, 72, 96)
