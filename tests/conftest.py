"""Shared test setup: 8 host CPU devices for sharding tests, exact float32 matmuls.

The suite runs on the host CPU whatever accelerators the machine has (its tolerances are the
CPU's); tests marked ``aot`` compile for GPUs and TPUs without them and need the ``[aot]``
extra: where JAX's CUDA compiler or libtpu is missing they are deselected. Tests marked
``browser`` drive the demo page in Chromium: deselected where Chromium, chromedriver or
Selenium is missing.
"""

import importlib.util
import os
import pathlib
import shutil
import signal
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_DEVICE_COUNT = "--xla_force_host_platform_device_count"
# Flags given from outside (e.g. --xla_cpu_max_isa) are kept; each of ours only where not given.
# Compiling is most of the suite's time, so XLA:CPU compiles cheaply here: LLVM's optimisation
# passes off, the element-wise fusions through the classic emitters (not the MLIR fusion
# emitters), one LLVM module per program (split modules compile on more threads, which the two
# workers leave no room for). Together about half the CPU time of a compile. The programs compute
# the same values up to float rounding, which every comparison's tolerance covers (as across CPUs).
_CHEAP_COMPILES = {"--xla_backend_optimization_level": "0", "--xla_llvm_disable_expensive_passes": "true",
                   "--xla_cpu_use_fusion_emitters": "false", "--xla_cpu_parallel_codegen_split_count": "1"}
_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)]
_FLAGS += [f"{flag}={value}" for flag, value in _CHEAP_COMPILES.items()
           if not any(f.startswith(flag + "=") for f in _FLAGS)]
os.environ["XLA_FLAGS"] = " ".join([*_FLAGS, f"{_DEVICE_COUNT}=8"])
# Compiled programs are shared within a test session, not with the user's cache.
os.environ.setdefault("VDA_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="vda-jax-xla-"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# A suite started in the background of a non-interactive shell inherits SIGINT ignored, as would every
# process it starts (an ignored signal stays ignored across exec); the Ctrl-C tests need Python's default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
AOT_COMPILERS = ("jax_plugins.xla_cuda13", "libtpu")
# The modules that take longest (minutes of compiles and child processes), longest first: the workers
# take modules in collection order, so these start first and no worker is left running one at the end.
LONGEST_FIRST = ("test_multihost.py", "test_train_step.py", "test_scripts.py", "test_cli_infer.py",
                 "test_train_loop.py", "test_export.py", "test_demo.py")


def _browser_tools() -> bool:
    """What the ``browser`` tests need beyond vda-jax: Chromium, its driver and Selenium."""
    return bool(shutil.which("chromium") and shutil.which("chromedriver") and importlib.util.find_spec("selenium"))


def pytest_collection_modifyitems(config, items):
    from vda_jax.aot.targets import installed

    missing = [marker for marker, present in (("aot", all(installed(name) for name in AOT_COMPILERS)),
                                              ("browser", _browser_tools())) if not present]
    deselected = [item for item in items if any(item.get_closest_marker(marker) for marker in missing)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def child_env():
    """``child_env(devices, **variables)``: the environment of a child process with ``devices`` CPU devices
    and this session's other XLA flags."""

    def env(devices: int, **variables: str) -> dict[str, str]:
        return {**os.environ, "XLA_FLAGS": " ".join([*_FLAGS, f"{_DEVICE_COUNT}={devices}"]), **variables}

    return env


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
