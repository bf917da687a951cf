"""Shared test setup: 8 host CPU devices for sharding tests, exact float32 matmuls."""

import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Compiled programs are shared within a test session, not with the user's cache.
os.environ.setdefault("VDA_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="vda-jax-xla-"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    """``tiny.pth`` (official layout, seeded random weights) converted to our format."""
    from vda_jax.convert.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("models") / "tiny"
    convert_checkpoint(str(FIXTURES / "tiny.pth"), str(out), config_path=str(FIXTURES / "tiny_architecture.json"))
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from vda_jax.checkpoint import load_checkpoint

    return load_checkpoint(str(tiny_model_dir))


@pytest.fixture(scope="session")
def x264_subme():
    """Reads an mp4's x264 "subme" setting (x264 writes its settings into the stream; presets differ in it)."""

    def read(path) -> int:
        settings = pathlib.Path(path).read_bytes().split(b"x264 - core")[1][:2000].decode("ascii", "replace")
        return int(settings.split("subme=")[1].split()[0])

    return read
