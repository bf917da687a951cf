"""Model directories and training logs get the modes of any file the user creates (the umask's)."""

import os

from vda_jax.train.metrics_log import write_atomic


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_model_directory_and_logs_follow_the_umask(tiny_model_dir, tmp_path):
    mask = _umask()
    for root, _, names in os.walk(tiny_model_dir):
        assert os.stat(root).st_mode & 0o777 == 0o777 & ~mask, root
        for name in names:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o666 & ~mask, name
    log = tmp_path / "config.json"
    write_atomic(str(log), "{}")
    assert os.stat(log).st_mode & 0o777 == 0o666 & ~mask
    assert os.listdir(tmp_path) == ["config.json"]
