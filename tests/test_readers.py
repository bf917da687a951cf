"""Checkpoint readers against files written by torch and safetensors, and against hostile files."""

import builtins
import json
import os
import pathlib
import pickle
import subprocess
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from vda_jax.convert import readers

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _write_zip(path, records):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)


class _Payload:
    """Unpickling it calls ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("name, count", [("tiny.pth", 351), ("tiny_dav2.pth", 239)])
def test_pth_matches_torch(name, count):
    # Reference written by torch.load: every key and shape, and sums and values of five tensors.
    reference = json.loads((FIXTURES / "tiny_pth_reference.json").read_text())[name]
    state = readers.read_checkpoint(FIXTURES / name)
    assert len(state) == count
    assert {k: list(v.shape) for k, v in state.items()} == reference["shapes"]
    assert list(state) == list(reference["shapes"])
    assert {v.dtype.name for v in state.values()} == set(reference["dtypes"])
    for key, expected in reference["values"].items():
        flat = state[key].ravel()
        np.testing.assert_array_equal(flat[:6], np.float32(expected["first"]))
        np.testing.assert_array_equal(flat[-3:], np.float32(expected["last"]))
        np.testing.assert_allclose(flat.sum(dtype=np.float64), expected["sum"], rtol=1e-12)


def test_pth_layouts_and_dtypes_match_torch():
    # strided.pth holds {"model": tensors, "epoch": 7}: transposed, sliced (non-zero offset, shared
    # storage), 0-d, empty and Parameter tensors, and one tensor of every storage type.
    expected = np.load(FIXTURES / "strided_expected.npz")
    state = readers.read_checkpoint(FIXTURES / "strided.pth")
    assert list(state) == list(expected.files)
    for key, array in state.items():
        want = expected[key].view(ml_dtypes.bfloat16) if key == "bf16" else expected[key]
        assert array.dtype == want.dtype, key
        assert array.flags.c_contiguous and array.flags.writeable, key
        np.testing.assert_array_equal(array, want, err_msg=key)


def test_big_endian_pth(tmp_path):
    # The same archive with a "big" byteorder record and every float32 record byte-swapped.
    source = FIXTURES / "tiny_dav2.pth"
    with zipfile.ZipFile(source) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    for name, data in records.items():
        if "/data/" in name:
            records[name] = np.frombuffer(data, "<f4").astype(">f4").tobytes()
    records["tiny_dav2/byteorder"] = b"big"
    _write_zip(tmp_path / "big.pth", records)
    big, little = readers.read_pth(tmp_path / "big.pth"), readers.read_pth(source)
    assert list(big) == list(little)
    for key in little:
        assert big[key].dtype.isnative
        np.testing.assert_array_equal(big[key], little[key], err_msg=key)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("call", ["os.system", "builtins.eval", "subprocess.call"])
def test_refuses_code_in_pickle_without_running_it(tmp_path, call, protocol):
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
    }[call]
    func = payload.func
    _write_zip(
        tmp_path / "evil.pth",
        {"evil/data.pkl": pickle.dumps({"weight": payload}, protocol=protocol), "evil/byteorder": b"little"},
    )
    # Protocol 2 writes Python 2 module names (__builtin__, commands), which the error repeats.
    with pytest.raises(readers.CheckpointError, match=rf"refusing pickle global [\w.]+\.{func.__name__}:"):
        readers.read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_refuses_legacy_pickle_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "old.pth").write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(readers.CheckpointError, match=r"old\.pth: legacy .* re-save it"):
        readers.read_checkpoint(tmp_path / "old.pth")
    assert not marker.exists()


def _truncated(data):
    return data[: len(data) // 2]


def _bit_flipped(data):  # inside a storage record (tiny/data/142), so only its CRC can tell
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]


@pytest.mark.parametrize("damage", [_truncated, _bit_flipped])
def test_damaged_pth(tmp_path, damage):
    path = tmp_path / "model.pth"
    path.write_bytes(damage((FIXTURES / "tiny.pth").read_bytes()))
    message = r"^truncated or corrupt checkpoint .*model\.pth .*: re-download it$"
    with pytest.raises(readers.CheckpointError, match=message):
        readers.read_checkpoint(path)


def test_pth_without_tensors(tmp_path):
    _write_zip(tmp_path / "meta.pth", {"meta/data.pkl": pickle.dumps({"epoch": 7}, protocol=2)})
    with pytest.raises(readers.CheckpointError, match=r"meta\.pth: expected a state dict .* keys \['epoch'\]"):
        readers.read_checkpoint(tmp_path / "meta.pth")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(readers.CheckpointError, match=r"absent\.pth does not exist; give the official \.pth or "
                                                     r"\.safetensors file"):
        readers.read_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "notes.pth").write_text("just some text, not weights\n")
    with pytest.raises(readers.CheckpointError, match=r"notes\.pth: not a checkpoint"):
        readers.read_checkpoint(tmp_path / "notes.pth")


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f16": rng.normal(size=(2, 3, 2)).astype(np.float16),
        "bf16": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
        "f64": rng.normal(size=(2,)),
        "i64": np.array([-(2**40), 3]),
        "i32": np.array([[-(2**30)], [7]], np.int32),
        "i16": np.array([-300, 5], np.int16),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "bool": np.array([True, False]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "weights.pth"  # the content decides, not the name
    safetensors.numpy.save_file(tensors, path, metadata={"format": "np"})
    state = readers.read_checkpoint(path)
    assert set(state) == set(tensors)
    for key, want in tensors.items():
        assert state[key].dtype == want.dtype, key
        np.testing.assert_array_equal(state[key], want, err_msg=key)


def _safetensors_file(path, header, data):
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def test_damaged_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    _safetensors_file(path, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(12))
    with pytest.raises(readers.CheckpointError, match=r"^truncated or corrupt checkpoint .*\(tensor 'x' spans"):
        readers.read_checkpoint(path)
    path.write_bytes((10**6).to_bytes(8, "little") + b'{"x": 1}')
    with pytest.raises(readers.CheckpointError, match=r"^truncated or corrupt checkpoint .*header"):
        readers.read_checkpoint(path)
    _safetensors_file(path, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(readers.CheckpointError, match="byte range that does not match its shape"):
        readers.read_checkpoint(path)
    _safetensors_file(path, {"x": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(readers.CheckpointError, match="unsupported or malformed header entry for 'x'"):
        readers.read_checkpoint(path)


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path):
    # A 128..255-byte header makes the first byte 0x80, the pickle protocol marker.
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = tmp_path / "w.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"note": "x" * 40})
    assert path.read_bytes()[0] == 0x80
    np.testing.assert_array_equal(readers.read_checkpoint(path)["w"], tensors["w"])
