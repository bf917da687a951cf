"""The store of whole compiled programs: keys, round trips, and what it does when it cannot store."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vda_jax import compilation_cache, executables
from vda_jax.models.vda import VideoDepthAnything


class _UserModel(VideoDepthAnything):
    pass


def _program() -> jax.stages.Compiled:
    return jax.jit(lambda x: jnp.sin(x) * 2.0).lower(jax.ShapeDtypeStruct((3,), jnp.float32)).compile()


@pytest.fixture
def events():
    """The names of the ``jax.monitoring`` events recorded during the test."""
    names = []
    listener = lambda name, **kwargs: names.append(name)  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    yield names
    jax.monitoring.unregister_event_listener(listener)


def test_a_stored_program_loads_and_runs_the_same(tmp_path, events):
    entry = executables.Key(str(tmp_path / "program.pkl"), (jax.devices()[0],))
    assert executables.load(entry) is None  # nothing stored yet
    compiled = _program()
    assert executables.save(entry, compiled) is compiled
    loaded = executables.load(entry)
    x = np.array([0.0, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(compiled(x)))
    assert [e for e in events if e.startswith("/vda_jax/")] == [executables.MISS_EVENT, executables.HIT_EVENT]
    stored = executables.load_or_start_compile(entry, lambda: pytest.fail("lowered again")).result()
    np.testing.assert_array_equal(np.asarray(stored(x)), np.asarray(compiled(x)))


def test_a_program_that_cannot_be_stored_still_runs(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    entry = executables.Key(str(tmp_path / "file" / "program.pkl"), (jax.devices()[0],))
    compiled = _program()
    with pytest.warns(RuntimeWarning, match="not stored"):
        assert executables.save(entry, compiled) is compiled
    assert executables.load(entry) is None
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # nothing half-written


def test_keys_follow_the_description_and_the_devices(monkeypatch):
    first, second = jax.devices()[:2]
    same = executables.key(("window-encode", (28, 42)), [first])
    assert same == executables.key(("window-encode", (28, 42)), [first])
    assert same.path.startswith(compilation_cache.enable())
    assert len({same.path, executables.key(("window-encode", (28, 56)), [first]).path,
                executables.key(("window-decode", (28, 42)), [first]).path,
                executables.key(("window-encode", (28, 42)), [second]).path}) == 4
    # A model class of the user's: its code is not in the key, so its programs are not stored.
    assert executables.key(("window-encode", (28, 42)), [first], [VideoDepthAnything, nnx.Linear]) is not None
    assert executables.key(("window-encode", (28, 42)), [first], [VideoDepthAnything, _UserModel]) is None
    monkeypatch.setattr(compilation_cache, "enable", lambda: None)  # the cache turned off
    assert executables.key(("window-encode", (28, 42)), [first]) is None
    assert executables.load(None) is None
