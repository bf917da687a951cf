"""`vda-jax demo`: the Gradio app in-process, driven through gradio_client, and the pieces it draws with."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile

import gradio_client
import httpx
import jax
import numpy as np
import pytest
from PIL import Image
from vda_jax.convert.convert import convert_state_dict
from vda_jax.convert.readers import read_checkpoint

from vda_jax import cli, demo, executables
from vda_jax.assets import SAMPLE_VIDEO
from vda_jax.config import ModelConfig
from vda_jax.inference.stream import stream_depth
from vda_jax.inference.video import infer_video_depth
from vda_jax.io import outputs
from vda_jax.io.video import read_frames

SIZE, FRAMES = 56, 24  # network input short side, frames per request: a few seconds each on a CPU
LIMITS = demo.Limits(max_upload_mb=8, max_len=FRAMES)  # the depths .npz goes back up for /plot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    """The page serving the tiny model as `vda-jax demo` does, with the system temp dir in a folder of its own."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(root))
        with demo.running(tiny_model, SIZE, LIMITS, precision="fp32", port=_free_port()) as page:
            client = gradio_client.Client(page.local_url, download_files=str(root / "client"), verbose=False)
            yield page, client, root


def _depth(client, video=SAMPLE_VIDEO, *, max_len=FRAMES, streaming=False, frame=3):
    return client.predict(gradio_client.handle_file(video), SIZE, max_len, "fp32", streaming, frame,
                          api_name="/depth")


def _sample(max_len: int) -> np.ndarray:
    return np.stack(list(read_frames(SAMPLE_VIDEO, max_res=LIMITS.max_res, max_len=max_len)))


def test_sample_in_depth_out_as_infer(app, tiny_model):
    _, client, _ = app
    pair, status, downloads, slider, plot = _depth(client)
    assert sorted(os.path.basename(p) for p in downloads) == ["sample_depths.npz", "sample_vis.mp4"]
    npz = next(p for p in downloads if p.endswith(".npz"))
    depths = np.load(npz)["depths"]
    frames = _sample(FRAMES)
    expected = infer_video_depth(tiny_model, frames, input_size=SIZE, precision="fp32")
    np.testing.assert_allclose(depths, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # Source | depth in one video: the frames, and the depth coloured over the video's range.
    shown = np.stack(list(read_frames(pair))).astype(np.float32)
    assert shown.shape == (FRAMES, 192, 2 * 256, 3)
    colours = outputs.colorize(expected, expected.min(), expected.max())
    assert np.abs(shown[:, :, :256] - frames).mean() < 4  # H.264 twice
    assert np.abs(shown[:, :, 256:] - colours).mean() < 4
    assert len(list(read_frames(next(p for p in downloads if p.endswith("_vis.mp4"))))) == FRAMES
    assert f"{FRAMES} frames of 256x192" in status and "frames/s" in status
    assert slider["maximum"] == FRAMES - 1 and slider["value"] == 3
    label = demo.depth_label(metric=False)
    np.testing.assert_array_equal(np.asarray(Image.open(plot).convert("RGB")),
                                  demo.depth_plot(expected[3], title="frame 3", label=label))
    # Moving the slider plots another frame of the same depths.
    other = client.predict([gradio_client.handle_file(p) for p in downloads], 17, api_name="/plot")
    np.testing.assert_array_equal(np.asarray(Image.open(other).convert("RGB")),
                                  demo.depth_plot(depths[17], title="frame 17", label=label))


def test_requests_share_the_compiled_step(app):
    """A second request neither traces, compiles nor loads the window programs from the disk store."""
    _, client, _ = app
    _depth(client)
    events = []
    watched = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration",
               executables.HIT_EVENT, executables.MISS_EVENT)

    def timed(event, duration, **kwargs):
        events.append(event)

    def counted(event, **kwargs):
        events.append(event)

    jax.monitoring.register_event_duration_secs_listener(timed)
    jax.monitoring.register_event_listener(counted)
    try:
        _depth(client, frame=1)
        assert not [e for e in events if e in watched]
        jax.jit(lambda x: x + 1)(0)  # the control: a function of its own is traced
    finally:
        jax.monitoring.unregister_event_duration_listener(timed)
        jax.monitoring.unregister_event_listener(counted)
    assert watched[0] in events


def test_one_request_at_a_time(app, monkeypatch):
    page, client, _ = app
    spans, real = [], demo.run_request

    def timed(*args, **kwargs):
        start = time.monotonic()
        time.sleep(0.5)  # long enough for the second request to arrive while this one runs
        result = real(*args, **kwargs)
        spans.append((start, time.monotonic()))
        return result

    monkeypatch.setattr(demo, "run_request", timed)
    jobs = [client.submit(gradio_client.handle_file(SAMPLE_VIDEO), SIZE, 4, "fp32", False, 0, api_name="/depth")
            for _ in range(2)]
    for job in jobs:
        job.result()
    first, second = sorted(spans)
    assert first[1] <= second[0]
    assert page.server_name == "127.0.0.1"  # and only this machine can reach it


def test_bad_uploads_get_a_message(app, tmp_path):
    page, client, _ = app
    text = tmp_path / "notes.mp4"
    text.write_text("a text file, not a video\n")
    with pytest.raises(gradio_client.exceptions.AppError, match="notes.mp4 could not be read as a video"):
        _depth(client, str(text))
    other = tmp_path / "notes.txt"
    other.write_text("a text file\n")
    with pytest.raises(gradio_client.exceptions.AppError, match="notes.txt is not a video file; upload one of"):
        _depth(client, str(other))
    big = tmp_path / "big.mp4"
    big.write_bytes(bytes(LIMITS.max_upload_bytes + 1))
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {LIMITS.max_upload_bytes} bytes"):
        _depth(client, str(big))
    # The server refuses it too, whatever the client checks.
    with open(big, "rb") as f:
        response = httpx.post(f"{page.local_url}gradio_api/upload", files={"files": ("big.mp4", f)})
    assert response.status_code == 413 and "maximum allowed size" in response.text


def test_metric_streaming_request_with_point_clouds(tiny_model, fixtures, tmp_path):
    """What the page runs for a metric model with streaming on: the library's stream, and point clouds."""
    config = ModelConfig.from_dict({**tiny_model.config.to_dict(), "metric": True})
    metric = convert_state_dict(read_checkpoint(fixtures / "tiny.pth"), config)
    settings = demo.Settings(input_size=SIZE, max_len=4, precision="fp32", streaming=True)
    result = demo.run_request(metric, SAMPLE_VIDEO, str(tmp_path), settings, LIMITS)
    assert [os.path.basename(p) for p in result.downloads] == ["sample_vis.mp4", "sample_depths.npz", "sample_ply.zip"]
    expected = np.stack(list(stream_depth(metric, _sample(4), input_size=SIZE, precision="fp32")))
    depths = np.load(result.npz)["depths"]
    np.testing.assert_allclose(depths, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    with zipfile.ZipFile(result.downloads[2]) as archive:
        assert sorted(archive.namelist()) == [f"frame_{i:05d}.ply" for i in range(4)]
    assert result.info.num_frames == 4 and len(list(read_frames(result.pair))) == 4


def test_nothing_left_behind(tiny_model, tmp_path, monkeypatch):
    """Each request's folder goes once its outputs are served; uploads and outputs when the server stops."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def ours() -> list[str]:  # (gradio_client leaves empty folders of its own there)
        return [name for name in os.listdir(tmp_path) if name.startswith("vda-jax-demo-")]

    before = os.environ.get("GRADIO_TEMP_DIR")
    with demo.running(tiny_model, SIZE, LIMITS, precision="fp32", port=_free_port()) as page:
        client = gradio_client.Client(page.local_url, download_files=str(tmp_path / "client"), verbose=False)
        _depth(client, max_len=4)
        cache = os.environ["GRADIO_TEMP_DIR"]
        assert ours() == [os.path.basename(os.path.dirname(cache))] and _files(cache)  # uploads, served outputs
    assert ours() == [] and os.environ.get("GRADIO_TEMP_DIR") == before


def test_depth_plot_colours_and_bar():
    depth = np.linspace(2.0, 10.0, 48 * 64, dtype=np.float32).reshape(48, 64)
    plot = demo.depth_plot(depth, title="frame 0", label="depth (m)", height=48)
    top, left, bar_x = 30, 10, 10 + 64 + 12
    np.testing.assert_array_equal(plot[top:top + 48, left:left + 64], outputs.colorize(depth, 2.0, 10.0))
    np.testing.assert_array_equal(plot[top, bar_x:bar_x + 20], np.broadcast_to(outputs.INFERNO[255], (20, 3)))
    np.testing.assert_array_equal(plot[top + 47, bar_x:bar_x + 20], np.broadcast_to(outputs.INFERNO[0], (20, 3)))


def test_npz_frame_reads_one_frame(tmp_path):
    depths = np.random.default_rng(0).random((5, 6, 7), dtype=np.float32)
    with outputs.NpzDepthWriter(str(tmp_path / "d.npz")) as writer:
        writer.write(depths)
    for i in (0, 3, 4):
        np.testing.assert_array_equal(demo.npz_frame(str(tmp_path / "d.npz"), i), depths[i])
    with pytest.raises(ValueError, match="no frame 5"):
        demo.npz_frame(str(tmp_path / "d.npz"), 5)


def test_cli_demo_options_and_missing_gradio(monkeypatch, capsys):
    args = cli.build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.max_upload_mb, args.checkpoint) == ("127.0.0.1", 7860, 200, None)
    for flags, message in [(["--max-upload-mb", "0"], "--max-upload-mb: must be a positive number, got 0"),
                           (["--port", "99999"], "--port: must be a port from 1 to 65535, got 99999")]:
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["demo", *flags])
        assert message in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if gradio were not installed
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err.strip() == 'vda-jax demo: error: the web demo needs gradio: pip install -e ".[demo]"'


def test_cli_demo_refuses_an_address_it_cannot_serve_before_loading_the_model(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_model", lambda checkpoint: pytest.fail("the model loaded first"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [(["--host", "999.1.1.1"], "--host 999.1.1.1 is neither an address nor a known host name; use "
                                           "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"),
                 (["--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine; use 127.0.0.1 "
                                           "(this machine only) or 0.0.0.0 (every interface)"),
                 (["--port", str(port)], f"--port {port} is in use on 127.0.0.1; choose another with --port")]
        for flags, message in cases:
            assert cli.main(["demo", *flags]) == 1
            assert capsys.readouterr().err == f"vda-jax demo: error: {message}\n"


def test_sigterm_stops_the_demo_and_removes_its_folders(tmp_path, child_env):
    """SIGTERM (`timeout`, SLURM, Kubernetes) as Ctrl-C: exit 143, no temporary folder left."""
    env = child_env(1, TMPDIR=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-m", "vda_jax.cli", "demo", "--port", str(_free_port())], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # once the page is served
        assert line.startswith("vda-jax demo: serving http://127.0.0.1:"), (line, process.stderr.read())
        assert [n for n in os.listdir(tmp_path) if n.startswith("vda-jax-demo-")]
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "vda-jax: stopped by SIGTERM" and "Traceback" not in err, err
    assert "Keyboard interruption" not in out
    assert [n for n in os.listdir(tmp_path) if n.startswith("vda-jax-demo-")] == []
