"""Official models by name: a local stand-in for the Hugging Face Hub serves official-layout checkpoints.

``FakeHub`` answers ``huggingface_hub``'s requests as huggingface.co does for LFS files, so
these tests run the real download code (cache, resume, errors) against 127.0.0.1.
"""

import contextlib
import gzip
import hashlib
import http.server
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import types
import urllib.parse

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import _http as hub_http
from PIL import Image
from vda_jax.convert import convert as convert_module
from vda_jax.convert.convert import detect_config
from vda_jax.convert.readers import read_checkpoint

from vda_jax import cli, pretrained
from vda_jax.checkpoint import load_checkpoint, read_config
from vda_jax.config import config_from_json
from vda_jax.train.config import default_config, validate
from vda_jax.train.init import initial_model

ROOT = pathlib.Path(__file__).parent.parent
TINY_REPO = "test-org/Tiny-Video-Depth"


class FakeHub:
    """huggingface.co's file endpoints, on 127.0.0.1.

    HEAD and GET ``/{repo}/resolve/{revision}/{filename}`` answer as the Hub does for an LFS
    file: ``X-Repo-Commit``, ``ETag`` and ``X-Linked-Etag`` (the content's sha256),
    ``X-Linked-Size``, ``Content-Length``, ``Accept-Ranges``; a GET with ``Range: bytes=N-``
    gets 206 and ``Content-Range``. A missing repository, revision or file is a 404 with the
    Hub's ``X-Error-Code``. Faults, set by a test: ``status`` (every request answers it),
    ``corrupt`` (one byte changed, headers unchanged), ``cut_after`` (the next GET sends that
    many bytes and drops the connection), ``at_half`` (called once a GET has sent half of a
    file, which then waits for ``release``).
    """

    commit = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.status: int | None = None
        self.corrupt = False
        self.cut_after: int | None = None
        self.at_half = None
        self.release = threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def gets(self) -> list[str | None]:
        """The Range header of every GET of a file so far (None: the whole file)."""
        return [rng for method, path, rng in self.requests if method == "GET" and "/resolve/" in path]

    def _answer(self, handler: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path, handler.headers.get("Range")))
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", urllib.parse.unquote(handler.path))
        repo, revision, filename = match.groups() if match else (None, None, None)
        if self.status is not None:
            return _empty(handler, self.status)
        if not any(r == repo for r, _ in self.files):
            return _empty(handler, 404, {"X-Error-Code": "RepoNotFound"})
        if revision not in ("main", self.commit):
            return _empty(handler, 404, {"X-Error-Code": "RevisionNotFound"})
        if (repo, filename) not in self.files:
            return _empty(handler, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit})
        data = self.files[repo, filename]
        sha256 = hashlib.sha256(data).hexdigest()
        served = data[:-1] + bytes([data[-1] ^ 0xFF]) if self.corrupt else data
        start = int(re.fullmatch(r"bytes=(\d+)-", handler.headers["Range"]).group(1)) if body and \
            handler.headers.get("Range") else 0
        handler.send_response(206 if start else 200)
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"',
                   "X-Linked-Size": len(data), "Content-Length": len(data) - start, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        for key, value in headers.items():
            handler.send_header(key, str(value))
        handler.end_headers()
        if not body:
            return
        payload = served[start:]
        with contextlib.suppress(ConnectionError):
            if self.cut_after is not None:
                handler.wfile.write(payload[:self.cut_after])
                handler.wfile.flush()
                self.cut_after = None
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                return
            half = len(payload) // 2
            handler.wfile.write(payload[:half])
            handler.wfile.flush()
            if self.at_half is not None:
                self.at_half()
                self.release.wait(30)
            handler.wfile.write(payload[half:])


def _empty(handler: http.server.BaseHTTPRequestHandler, status: int, headers: dict | None = None) -> None:
    handler.send_response(status)
    for key, value in {**(headers or {}), "Content-Length": "0"}.items():
        handler.send_header(key, value)
    handler.end_headers()


def tiny_entry(fixtures, name="tiny", licence="Apache-2.0", **changes) -> pretrained.PretrainedModel:
    fields = dict(name=name, repo_id=TINY_REPO, filename="tiny_video_depth.pth", licence=licence,
                  config=config_from_json(str(fixtures / "tiny_architecture.json")), parameters=1,
                  kind="video, relative depth")
    return pretrained.PretrainedModel(**{**fields, **changes})


@pytest.fixture
def hub(fixtures, tmp_path, monkeypatch):
    """A FakeHub serving tiny.pth as the model "tiny", with empty Hub and model caches.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is
    imported: in this process the tests set the values it keeps (the subprocess test below
    sets the variables).
    """
    server = FakeHub()
    server.files[TINY_REPO, "tiny_video_depth.pth"] = (fixtures / "tiny.pth").read_bytes()
    monkeypatch.setattr(hub_constants, "ENDPOINT", server.url)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(pretrained.DIR_ENV, str(tmp_path / "models"))
    monkeypatch.setitem(pretrained.PRETRAINED, "tiny", tiny_entry(fixtures))
    yield server
    server.stop()


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub waits 1, 2, 4, 8, 8 s between retries of a failed request; not here."""
    monkeypatch.setattr(hub_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))


def _cached_files(tmp_path) -> list[str]:
    """Every file and folder under the Hub and model caches, relative to tmp_path."""
    return sorted(str(p.relative_to(tmp_path)) for root in ("hf", "models") for p in (tmp_path / root).rglob("*")
                  if ".locks" not in p.parts and not p.name.endswith(".lock"))


def _assert_same_parameters(model, other) -> None:
    ours, theirs = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(other))
    assert [path for path, _ in ours] == [path for path, _ in theirs]
    for (path, a), (_, b) in zip(ours, theirs):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def _models(tmp_path) -> list[str]:
    folder = tmp_path / "models" / TINY_REPO.replace("/", "--")
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


def test_the_table_holds_the_official_architectures_and_parameter_counts(fixtures):
    with gzip.open(fixtures / "official_shapes.json.gz") as f:
        official = json.load(f)  # from the official modules
    assert len(pretrained.PRETRAINED) == 9
    for entry in pretrained.PRETRAINED.values():
        encoder = entry.name.rpartition("-")[2]
        shapes = {k: tuple(v) for k, v in official[encoder]["shapes"].items()}
        assert entry.config == detect_config(shapes, metric=entry.name.startswith("metric-"))
        image = entry.name.startswith("dav2-")
        assert entry.parameters == official[encoder]["num_params"] - image * official[encoder]["temporal_params"]
        assert entry.non_commercial == (encoder != "vits")
    with pytest.raises(ValueError, match="unknown model 'vitx'; the names are vits, vitb, vitl, metric-vits"):
        pretrained.lookup("vitx")


def test_download_converts_once_records_provenance_then_loads_offline(hub, fixtures, tmp_path, monkeypatch,
                                                                      tiny_model_dir):
    directory = pretrained.model_dir("tiny")
    data = (fixtures / "tiny.pth").read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    assert directory == str(tmp_path / "models" / "test-org--Tiny-Video-Depth" / f"tiny_video_depth-{sha256[:16]}")
    config, info = read_config(directory)
    assert info["pretrained"] == {"name": "tiny", "repo_id": TINY_REPO, "filename": "tiny_video_depth.pth",
                                  "revision": "main", "commit": FakeHub.commit, "sha256": sha256}
    assert config == read_config(str(tiny_model_dir))[0]
    _assert_same_parameters(pretrained.from_pretrained("tiny"), load_checkpoint(str(tiny_model_dir)))
    assert hub.gets() == [None]  # one download

    # Second run: the server is gone and huggingface_hub is offline; nothing is converted again.
    hub.stop()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(convert_module, "convert_checkpoint", lambda *a, **k: pytest.fail("converted again"))
    assert pretrained.model_dir("tiny") == directory


def test_offline_or_unreachable_with_nothing_cached_names_the_url_and_the_manual_route(hub, tmp_path, monkeypatch,
                                                                                       capsys, no_backoff):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    url = f"{hub.url}/{TINY_REPO}/resolve/main/tiny_video_depth.pth"
    with pytest.raises(pretrained.PretrainedError) as offline:
        pretrained.model_dir("tiny")
    assert str(offline.value) == (
        f"tiny_video_depth.pth is not in the cache and cannot be downloaded (HF_HUB_OFFLINE is set); download "
        f"{url} yourself, run `vda-jax convert tiny_video_depth.pth DIR` and pass --checkpoint DIR")
    assert hub.gets() == []
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    hub.stop()
    # The CLI says the same in one line.
    assert cli.main(["export", "--model", "tiny", str(tmp_path / "out.pth"), "--format", "official"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"vda-jax export: error: tiny_video_depth.pth is not in the cache and cannot be downloaded (no "
                   f"connection to the Hub); download {url} yourself, run `vda-jax convert tiny_video_depth.pth "
                   "DIR` and pass --checkpoint DIR")
    assert _cached_files(tmp_path) == [] and not (tmp_path / "out.pth").exists()


def test_corrupted_download_is_removed_and_fetched_again(hub, tmp_path):
    hub.corrupt = True
    with pytest.raises(pretrained.PretrainedError, match=r"tiny_video_depth.pth from test-org/Tiny-Video-Depth "
                       r"is corrupted \(sha256 \w{12}\.\.\., the Hub's is \w{12}\.\.\.\); removed it: run again"):
        pretrained.model_dir("tiny")
    assert not any("/blobs/" in f or f.endswith("/tiny_video_depth.pth") for f in _cached_files(tmp_path))
    assert _models(tmp_path) == []
    hub.corrupt = False
    assert pretrained.model_dir("tiny").startswith(str(tmp_path / "models"))
    assert hub.gets() == [None, None]


def test_a_dropped_download_resumes_where_it_stopped(hub, monkeypatch):
    # huggingface_hub keeps what it has received in 10 MB chunks: 1 MB here, for a 5 MB file.
    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", 2**20)
    hub.cut_after = 3 * 2**20 + 1000
    pretrained.model_dir("tiny")  # checked against the sha256, so the pieces joined up
    assert hub.gets() == [None, f"bytes={3 * 2**20}-"]


@pytest.mark.parametrize("fault, message", [
    ("status 404", "tiny_video_depth.pth is not in the cache and cannot be downloaded (the server answered 404); "
                   "download "),
    ("status 500", "tiny_video_depth.pth is not in the cache and cannot be downloaded (the server answered 500); "
                   "download "),
    ("no such file", "the Hub has no tiny_video_depth.pth in test-org/Tiny-Video-Depth at revision main (it "
                     "answered 404)"),
    ("no such revision", "the Hub has no tiny_video_depth.pth in test-org/Tiny-Video-Depth at revision v9 (it "
                         "answered 404)"),
])
def test_server_errors_are_one_line_and_leave_nothing(hub, tmp_path, capsys, no_backoff, fault, message):
    if fault.startswith("status"):
        hub.status = int(fault.split()[1])
    elif fault == "no such file":
        hub.files[TINY_REPO, "other.pth"] = hub.files.pop((TINY_REPO, "tiny_video_depth.pth"))
    revision = ["--revision", "v9"] if fault == "no such revision" else []
    assert cli.main(["export", "--model", "tiny", *revision, str(tmp_path / "out.pth"), "--format", "official"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vda-jax export: error: {message}") and "\n" not in err, err
    assert not [f for f in _cached_files(tmp_path) if "/blobs/" in f] and _models(tmp_path) == []


def test_ctrl_c_during_download_or_conversion_leaves_nothing_half_written(hub, tmp_path, monkeypatch):
    main = threading.main_thread().ident
    hub.at_half = lambda: signal.pthread_kill(main, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        pretrained.model_dir("tiny")
    hub.release.set()
    assert not [f for f in _cached_files(tmp_path) if "/blobs/" in f] and _models(tmp_path) == []
    hub.at_half = None

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", interrupted)  # params half written
    with pytest.raises(KeyboardInterrupt):
        pretrained.model_dir("tiny")
    assert _models(tmp_path) == []


def test_the_licence_of_a_non_commercial_model_is_printed_at_its_first_download(hub, fixtures, monkeypatch, capsys):
    monkeypatch.setitem(pretrained.PRETRAINED, "tiny-nc", tiny_entry(fixtures, "tiny-nc", "CC-BY-NC-4.0"))
    pretrained.download("tiny-nc")
    assert capsys.readouterr().err.count(f"tiny-nc: the weights in {TINY_REPO} are licensed CC-BY-NC-4.0, "
                                         "for non-commercial use only") == 1
    pretrained.model_dir("tiny-nc")
    pretrained.download("tiny")  # the same file, Apache-2.0
    assert "licensed" not in capsys.readouterr().err


def test_models_lists_names_sizes_licences_and_the_cache(hub, capsys):
    assert cli.main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert re.fullmatch(r"vitl +video, relative depth +384\.4 M +1,538 MB +CC-BY-NC-4\.0", rows["vitl"])
    assert rows["tiny"].endswith("Apache-2.0")
    pretrained.download("tiny")
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out.count("Apache-2.0    downloaded") == 1
    pretrained.model_dir("tiny")
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out.count("Apache-2.0    converted") == 1


@pytest.mark.parametrize("command", [["infer", "v.mp4"], ["eval", "--dataset", "d"], ["demo"], ["export", "o.pth"],
                                     ["pseudo-label", "images", "--output", "labels"]])
def test_every_command_takes_a_name_or_a_directory_not_both(command, capsys):
    args = cli.build_parser().parse_args([*command, "--model", "vitl", "--revision", "v1"])
    assert (args.model, args.revision, args.checkpoint) == ("vitl", "v1", None)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["export", "d", "o.pth", "--model", "vitl"] if command[0] == "export" else
                                      [*command, "--checkpoint", "d", "--model", "vitl"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_unknown_names_and_a_stray_revision_are_refused(capsys, tmp_path):
    assert cli.main(["export", "--model", "vitx", str(tmp_path / "o.pth"), "--format", "official"]) == 1
    assert capsys.readouterr().err.strip() == ("vda-jax export: error: unknown model 'vitx'; the names are vits, "
                                               f"{', '.join(list(pretrained.PRETRAINED)[1:])} (`vda-jax models` "
                                               "lists them)")
    assert cli.main(["export", str(tmp_path), str(tmp_path / "o.pth"), "--format", "official", "--revision", "v1"]) == 1
    assert "--revision goes with --model NAME" in capsys.readouterr().err


def test_export_by_name_gives_back_the_official_tensors(hub, fixtures, tmp_path):
    out = tmp_path / "back.pth"
    assert cli.main(["export", "--model", "tiny", str(out), "--format", "official"]) == 0
    ours, official = read_checkpoint(out), read_checkpoint(fixtures / "tiny.pth")
    assert ours.keys() == official.keys()
    for key in official:
        np.testing.assert_array_equal(ours[key], official[key], err_msg=key)


def test_training_starts_from_a_name_as_from_its_file(hub, fixtures, tiny_model_dir):
    config = config_from_json(str(fixtures / "tiny_architecture.json"))
    _assert_same_parameters(initial_model(config, "tiny", seed=3, dtype=np.float32),
                            load_checkpoint(str(tiny_model_dir)))
    # A name is checked against the trained architecture before any work.
    c = default_config()
    c.init_from = "dav2-vitl"
    with pytest.raises(ValueError, match="init_from=dav2-vitl holds a vitl model but model.name is 'vits'; set "
                                         "model.name=vitl"):
        validate(c)
    c.model.name = "vitl-metric"
    validate(c)


def test_cli_infer_by_name_matches_the_official_pipeline_then_runs_offline(fixtures, tmp_path):
    """The issue's check, in fresh processes that read HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE."""
    ref = np.load(fixtures / "tiny_video.npz")
    frames = tmp_path / "clip"
    frames.mkdir()
    for i, frame in enumerate(ref["n20_72x96_s70_frames"]):
        Image.fromarray(frame).save(frames / f"{i:03d}.png")
    server = FakeHub()
    server.files[TINY_REPO, "tiny_video_depth.pth"] = (fixtures / "tiny.pth").read_bytes()
    register = (f"from vda_jax import cli, config, pretrained; pretrained.PRETRAINED['tiny'] = pretrained."
                f"PretrainedModel('tiny', {TINY_REPO!r}, 'tiny_video_depth.pth', 'Apache-2.0', config."
                f"config_from_json({str(fixtures / 'tiny_architecture.json')!r}), 1, 'test'); "
                "raise SystemExit(cli.main())")
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf"),
           pretrained.DIR_ENV: str(tmp_path / "models"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    depths = []
    try:
        for run in ("online", "offline"):
            if run == "offline":
                server.stop()
                env["HF_HUB_OFFLINE"] = "1"
            out = tmp_path / run
            done = subprocess.run([sys.executable, "-c", register, "infer", str(frames), "--model", "tiny",
                                   "--input-size", "70", "--save-npz", "--output-dir", str(out), "--quiet",
                                   "--video-preset", "ultrafast"], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            depths.append(np.load(out / "clip_depths.npz")["depths"])
    finally:
        server.stop()
    expected = ref["n20_72x96_s70_depth"]
    for depth in depths:
        assert np.abs(depth - expected).max() <= 1e-5 * np.abs(expected).max()
    assert len(server.gets()) == 1


def test_model_free_checks_come_before_a_download(tmp_path, monkeypatch, capsys):
    """An export's output, the inputs of an inference and an evaluation's dataset are checked before --model
    fetches anything."""
    monkeypatch.setattr(pretrained, "model_dir", lambda *a, **k: pytest.fail("the model was fetched first"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "clip.mp4").write_bytes(b"")
    for command, message in [
            (["export", "--model", "vits", str(tmp_path)], f"--format onnx output {tmp_path} is a folder; name a file "
                                                           "in it"),
            (["export", "--model", "vits", str(tmp_path / "m.pth")], f"--format onnx output {tmp_path / 'm.pth'} is "
                                                                     "named like a --format official file"),
            (["infer", str(tmp_path / "a/clip.mp4"), str(tmp_path / "b/clip.mp4"), "--model", "vits", "--output-dir",
              str(tmp_path / "out")], "several inputs would write clip_src.mp4"),
            (["infer", "--sample", "--model", "vits", "--streaming", "--batch-size", "2", "--output-dir",
              str(tmp_path / "out")], "--batch-size 2: streaming runs one video at a time"),
            (["eval", "--model", "vits", "--dataset", "vda_synthetic/nosuch", "--data-dir", str(tmp_path / "a")],
             f"dataset vda_synthetic/nosuch is not built in {tmp_path / 'a'}")]:
        assert cli.main(command) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"vda-jax {command[0]}: error: {message}") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
