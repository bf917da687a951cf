"""The converter: strict key map, parameter counts of the released variants, CLI and atomic output."""

import gzip
import json

import numpy as np
import pytest
from vda_jax.convert.convert import detect_config
from vda_jax.convert.keymap import KeyMismatchError, plan_conversion

from vda_jax import cli
from vda_jax.checkpoint import abstract_model, count_params, flat_shapes, load_checkpoint
from vda_jax.config import model_config


@pytest.fixture(scope="module")
def official(fixtures):
    """Key -> shape of the official modules' state dicts, with their parameter counts."""
    with gzip.open(fixtures / "official_shapes.json.gz") as f:
        return json.load(f)


@pytest.mark.parametrize("encoder, params, temporal", [
    ("vits", 29_035_137, 4_250_048), ("vitb", 114_441_409, 16_970_624), ("vitl", 384_390_337, 49_074_688)])
def test_released_variants_map_strictly_with_official_parameter_counts(official, encoder, params, temporal):
    shapes = {k: tuple(v) for k, v in official[encoder]["shapes"].items()}
    config = detect_config(shapes)
    assert config == model_config(encoder)
    _, abstract = abstract_model(config)
    plan = plan_conversion(shapes, flat_shapes(abstract))
    assert len(plan.moves) == len(shapes) and not plan.unfilled
    assert count_params(abstract) == params == official[encoder]["num_params"]
    assert count_params(abstract["head"]["temporal"]) == temporal


def test_mismatches_are_all_listed(official):
    shapes = {k: tuple(v) for k, v in official["vits"]["shapes"].items()}
    del shapes["head.scratch.refinenet2.out_conv.bias"]
    shapes["head.extra.weight"] = (3,)
    shapes["pretrained.blocks.3.attn.qkv.weight"] = (384, 384)
    _, abstract = abstract_model(model_config("vits"))
    with pytest.raises(KeyMismatchError) as info:
        plan_conversion(shapes, flat_shapes(abstract))
    message = str(info.value)
    assert "1 unexpected: head.extra.weight" in message
    assert "1 missing: head.scratch.refinenet2.out_conv.bias" in message  # the mis-shaped qkv is not missing
    assert "1 mis-shaped: pretrained.blocks.3.attn.qkv.weight (384, 384)" in message


def test_cli_convert_roundtrip_and_errors(tmp_path, fixtures, capsys):
    out = tmp_path / "tiny"
    arch = str(fixtures / "tiny_architecture.json")
    assert cli.main(["convert", str(fixtures / "tiny.pth"), str(out), "--config", arch]) == 0
    model = load_checkpoint(str(out))
    assert model.config.embed_dim == 64 and not model.config.metric
    # An existing output is not overwritten silently.
    assert cli.main(["convert", str(fixtures / "tiny.pth"), str(out), "--config", arch]) == 1
    assert "already exists" in capsys.readouterr().err
    # Without --config the tiny widths are not a released encoder.
    assert cli.main(["convert", str(fixtures / "tiny.pth"), str(tmp_path / "x")]) == 1
    assert "unknown encoder width 64" in capsys.readouterr().err
    # A truncated checkpoint fails with one line and leaves nothing behind.
    bad = tmp_path / "bad.pth"
    bad.write_bytes((fixtures / "tiny.pth").read_bytes()[:100_000])
    assert cli.main(["convert", str(bad), str(tmp_path / "y"), "--config", arch]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "tiny"]


def test_metric_flag_and_wrong_architecture(tmp_path, fixtures, capsys):
    arch = json.loads((fixtures / "tiny_architecture.json").read_text())
    arch["architecture"]["features"] = 64
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    assert cli.main(["convert", str(fixtures / "tiny.pth"), str(tmp_path / "m"), "--config",
                     str(tmp_path / "arch.json")]) == 1
    assert "mis-shaped" in capsys.readouterr().err
    assert cli.main(["convert", str(fixtures / "tiny.pth"), str(tmp_path / "m"), "--metric", "--config",
                     str(fixtures / "tiny_architecture.json")]) == 0
    assert load_checkpoint(str(tmp_path / "m")).config.metric


def test_load_checkpoint_errors(tmp_path, fixtures):
    with pytest.raises(ValueError, match="is a file, not a vda-jax model directory.*vda-jax convert"):
        load_checkpoint(str(fixtures / "tiny.pth"))
    np.testing.assert_equal(tmp_path.exists(), True)


def test_convert_config_takes_a_model_directory_and_refuses_what_contradicts(tmp_path, fixtures, tiny_model_dir,
                                                                            capsys):
    """`vda-jax convert back.pth out --config MODEL_DIR`: the architecture of a model directory (#24.9)."""
    source = str(fixtures / "tiny.pth")  # the official layout of the tiny model directory's architecture
    expected = load_checkpoint(str(tiny_model_dir)).config
    for i, config in enumerate((tiny_model_dir, tiny_model_dir / "config.json")):
        assert cli.main(["convert", source, str(tmp_path / f"m{i}"), "--config", str(config)]) == 0
        assert load_checkpoint(str(tmp_path / f"m{i}")).config == expected
    capsys.readouterr()
    notes = tmp_path / "notes.txt"
    notes.write_text("not JSON")
    arch = fixtures / "tiny_architecture.json"
    for args, message in [
            ([source, "--config", str(notes)], f"{notes} is not JSON (Expecting value: line 1 column 1 (char 0)); "
                                               "give an architecture JSON or a vda-jax model directory"),
            ([source, "--config", str(arch), "--encoder", "vits"],
             f"--encoder vits contradicts --config {arch}, which describes a custom encoder; drop one of them"),
            ([str(tiny_model_dir), "--config", str(arch)],
             f"{tiny_model_dir} is a folder, not a checkpoint file; give the official .pth or .safetensors file"),
            ([source, "--config", str(tmp_path / "missing.json")],
             f"{tmp_path / 'missing.json'} does not exist; give an architecture JSON or a vda-jax model directory"),
            ([source, "--config", str(tiny_model_dir / "params")],
             f"{tiny_model_dir / 'params'} is a folder without a config.json; give an architecture JSON or a vda-jax "
             "model directory")]:
        assert cli.main(["convert", args[0], str(tmp_path / "x"), *args[1:]]) == 1
        assert capsys.readouterr().err == f"vda-jax convert: error: {message}\n"
    assert cli.main(["convert", source, str(notes / "m"), "--config", str(arch)]) == 1
    assert capsys.readouterr().err == (f"vda-jax convert: error: output directory {notes / 'm'} cannot be a folder: "
                                       f"{notes} is a file; choose another path\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1", "notes.txt"]

