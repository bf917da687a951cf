"""``vda-jax demo``: a Gradio page over the same library call as ``vda-jax infer``.

A request runs ``files.infer_files`` on one video into its own temporary folder,
composes the source and the depth video side by side and plots one frame's depth
with a colour bar. The folder is removed once Gradio has copied the outputs into
its cache: a folder of the server's own, whose files are deleted an hour after
they were made (``delete_cache``) and which is removed when the server stops.

The model is loaded once. The compiled window (or streaming) step of each input
size and frame size is cached by the inference modules, so every request of that
size shares it; the queue runs one request at a time, so two uploads never
compete for the device. Needs the optional ``demo`` extra (``INSTALL``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import os
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vda_jax.assets import SAMPLE_VIDEO
from vda_jax.inference import files
from vda_jax.io import outputs
from vda_jax.io.video import VIDEO_EXTENSIONS, VideoError, VideoInfo, VideoWriter, probe, read_frames
from vda_jax.models.vda import VideoDepthAnything
from vda_jax.precision import PRECISIONS

INSTALL = 'pip install -e ".[demo]"'  # the README's command, run in the vda-jax folder
_PLOT_HEIGHT = 360  # pixels of the depth plot's image
_CACHE_SECONDS = 3600  # outputs stay downloadable this long


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_upload_mb: float = 200
    max_len: int = 500  # frames
    max_res: int = 1280  # frames with a longer side are downscaled, as `vda-jax infer --max-res`

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's choices on the page."""

    input_size: int
    max_len: int
    precision: str
    streaming: bool


@dataclasses.dataclass(frozen=True)
class Result:
    """One request's outputs, all in its work folder."""

    pair: str  # the source (left) and the coloured depth (right) in one mp4
    downloads: list[str]  # the depth video, the depths .npz and, for metric models, the point clouds .zip
    npz: str
    info: VideoInfo  # the frames as processed
    seconds: float


def check_installed() -> None:
    if importlib.util.find_spec("gradio") is None:
        raise ValueError(f"the web demo needs gradio: {INSTALL}")


def check_address(host: str, port: int) -> None:
    """Raises ValueError naming ``--host`` or ``--port`` unless the server can listen on ``host:port``.

    Checked before the model loads; the server binds as this does (``SO_REUSEADDR``, as uvicorn).
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is not a port; choose one from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise ValueError(f"--host {host} is neither an address nor a known host name; use 127.0.0.1 (this "
                         "machine only) or 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port} is in use on {host}; choose another with --port") from None
            if e.errno == errno.EACCES:
                raise ValueError(f"--port {port} is not open to this user (ports below 1024 need root); choose "
                                 "another with --port") from None
            raise ValueError(f"--host {host} is not an address of this machine; use 127.0.0.1 (this machine "
                             "only) or 0.0.0.0 (every interface)") from None


def check_upload(path: str, limits: Limits) -> VideoInfo:
    """The upload's frames as a request reads them; ValueError naming the problem for anything else.

    Uploads over ``limits.max_upload_mb`` never get here: the server refuses them (``running``).
    """
    name = os.path.basename(path)
    if os.path.splitext(name)[1].lower() not in VIDEO_EXTENSIONS:
        raise ValueError(f"{name} is not a video file; upload one of {', '.join(sorted(VIDEO_EXTENSIONS))}")
    try:
        return probe(path).subsampled(max_res=limits.max_res, max_len=limits.max_len)
    except VideoError as e:  # the message names the server's copy of the file: name the user's instead
        raise ValueError(f"{name} could not be read as a video: {str(e).replace(path, name)}") from e


def run_request(model: VideoDepthAnything, video: str, workdir: str, settings: Settings, limits: Limits, *,
                on_frames: Callable[[int], None] = lambda n: None) -> Result:
    """``vda-jax infer`` of ``video`` with ``settings`` (and ``--save-npz``, ``--save-ply`` for metric models)."""
    metric = model.config.metric
    options = files.OutputOptions(workdir, save_npz=True, save_ply=metric)
    read = files.ReadOptions(max_res=limits.max_res, max_len=min(settings.max_len, limits.max_len))
    errors: list[str] = []
    start = time.perf_counter()
    report = files.infer_files(model, [video], options, read, input_size=settings.input_size,
                               precision=settings.precision, streaming=settings.streaming, progress=False,
                               log=errors.append, on_frames=on_frames)
    seconds = time.perf_counter() - start
    if report.failed:
        raise ValueError(errors[-1].replace(video, os.path.basename(video)))  # (the server's copy: name the user's)
    paths = files.output_paths(video, options)
    info = probe(video).subsampled(max_res=read.max_res, max_len=read.max_len)
    pair = os.path.join(workdir, "source_and_depth.mp4")
    side_by_side(paths["src"], paths["vis"], pair, info.fps)
    downloads = [paths["vis"], paths["npz"]]
    if metric:
        downloads.append(shutil.make_archive(paths["ply"], "zip", paths["ply"]))
    return Result(pair, downloads, paths["npz"], info, seconds)


def side_by_side(left: str, right: str, path: str, fps: float) -> None:
    """Writes the frames of two videos of one size next to each other (``[H, 2W, 3]``)."""
    with VideoWriter(path, fps) as writer:
        for a, b in zip(read_frames(left), read_frames(right)):
            writer.write(np.concatenate([a, b], axis=1))


def npz_frame(path: str, index: int) -> np.ndarray:
    """Frame ``index`` (``[H, W]``) of an uncompressed depths .npz (``NpzDepthWriter``), without reading the rest."""
    with zipfile.ZipFile(path) as archive, archive.open("depths.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
        if fortran_order or len(shape) != 3 or not 0 <= index < shape[0]:
            raise ValueError(f"{path}: no frame {index} in depths of shape {shape}")
        frame_bytes = shape[1] * shape[2] * dtype.itemsize
        member.seek(member.tell() + index * frame_bytes)
        return np.frombuffer(member.read(frame_bytes), dtype).reshape(shape[1:])


def depth_plot(depth: np.ndarray, *, title: str, label: str, height: int = _PLOT_HEIGHT) -> np.ndarray:
    """Depth ``[H, W]`` in inferno at ``height`` pixels, with a colour bar of its range: uint8 RGB ``[h, w, 3]``.

    The image and the bar share ``outputs.colorize`` over the frame's own range
    (the bar's top row is the maximum); the bar is labelled at five values.
    """
    depth = np.asarray(depth, np.float32)
    vmin, vmax = float(np.nanmin(depth)), float(np.nanmax(depth))
    width = max(1, round(depth.shape[1] * height / depth.shape[0]))
    image = Image.fromarray(outputs.colorize(depth, vmin, vmax))
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    bar = outputs.colorize(np.repeat(np.linspace(vmax, vmin, height, dtype=np.float32)[:, None], 20, 1), vmin, vmax)
    font = ImageFont.load_default(size=14)
    top, left, gap = 30, 10, 12
    bar_x = left + width + gap
    canvas = Image.new("RGB", (bar_x + 20 + 80, top + height + 10), "white")
    canvas.paste(image, (left, top))
    canvas.paste(Image.fromarray(bar), (bar_x, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 8), f"{title}: {label}", fill="black", font=font)
    for value in np.linspace(vmax, vmin, 5):
        y = top + (vmax - value) / (vmax - vmin) * (height - 1) if vmax > vmin else top
        draw.line([(bar_x + 20, y), (bar_x + 24, y)], fill="black")
        draw.text((bar_x + 27, y), f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}", fill="black", font=font,
                  anchor="lm")
    return np.asarray(canvas)


def depth_label(metric: bool) -> str:
    return "depth (m)" if metric else "relative inverse depth (larger is nearer)"


class _Rate:
    """Feeds a Gradio progress bar with frames done and frames per second."""

    def __init__(self, total: int, progress):
        self.total, self.progress = total, progress
        self.done, self.start = 0, time.perf_counter()
        progress((0, total), desc="compiling and starting", unit="frames")

    def __call__(self, count: int) -> None:
        self.done += count
        rate = self.done / (time.perf_counter() - self.start)
        self.progress((min(self.done, self.total), self.total), desc=f"{rate:.1f} frames/s", unit="frames")


def build(model: VideoDepthAnything, input_size: int, limits: Limits, *, precision: str, about: str = "",
          scratch: str | None = None):
    """The page, a ``gr.Blocks`` (served by ``running``): ``input_size`` and ``precision`` are its defaults,
    ``about`` a line on the model, ``scratch`` the folder of the requests' work folders (None: the system's
    temporary folder)."""
    import gradio as gr

    metric = model.config.metric
    label = depth_label(metric)

    def run(video: str | None, size: float, max_len: float, precision: str, streaming: bool, frame: float,
            progress=gr.Progress()) -> Iterator[tuple]:  # noqa: B008 (how Gradio passes its progress bar)
        if not video:
            raise gr.Error("Upload a video or press 'Use the sample video' first.", print_exception=False)
        try:
            info = check_upload(video, limits)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from e
        settings = Settings(int(size), int(max_len), precision, bool(streaming))
        workdir = tempfile.mkdtemp(prefix="vda-jax-demo-", dir=scratch)
        try:
            result = run_request(model, video, workdir, settings, limits,
                                 on_frames=_Rate(min(info.num_frames, settings.max_len), progress))
            count = result.info.num_frames
            frame = min(int(frame), count - 1)
            status = (f"{count} frames of {result.info.width}x{result.info.height} in {result.seconds:.1f} s: "
                      f"**{count / result.seconds:.1f} frames/s** (input size {settings.input_size}, "
                      f"{settings.precision}, {'streaming' if settings.streaming else 'windows'}; "
                      "the first request of a size includes compiling)")
            plot = depth_plot(npz_frame(result.npz, frame), title=f"frame {frame}", label=label)
            yield result.pair, status, result.downloads, gr.Slider(maximum=count - 1, value=frame), plot
        except ValueError as e:  # what infer_files reports for a video it cannot finish
            raise gr.Error(str(e), print_exception=False) from e
        finally:  # Gradio has copied the outputs into its cache by now
            shutil.rmtree(workdir, ignore_errors=True)

    def plot_frame(downloads: list[str] | None, frame: float) -> np.ndarray | None:
        npz = next((p for p in downloads or [] if p.endswith(".npz")), None)
        if npz is None:
            return None
        try:
            return depth_plot(npz_frame(npz, int(frame)), title=f"frame {int(frame)}", label=label)
        except (ValueError, OSError) as e:
            raise gr.Error(f"{e}; run the video again", print_exception=False) from e

    with gr.Blocks(title="Video Depth Anything (JAX)", analytics_enabled=False,
                   delete_cache=(_CACHE_SECONDS // 4, _CACHE_SECONDS)) as demo:
        gr.Markdown(f"# Video Depth Anything in JAX\nConsistent depth for a video: upload one (at most "
                    f"{limits.max_upload_mb:g} MB; the first {limits.max_len} frames are used) or use the sample. "
                    f"{about}")
        with gr.Row():
            with gr.Column(scale=2):
                video = gr.Video(label="Input video", sources=["upload"], height=300, elem_id="input-video")
                sample = gr.Button("Use the sample video", size="sm")
            with gr.Column(scale=1):
                size = gr.Slider(14, 1036, value=input_size, step=14, label="Input size",
                                 info="short side of the network input")
                max_len = gr.Slider(1, limits.max_len, value=limits.max_len, step=1, label="Max length (frames)")
                precision_choice = gr.Dropdown(list(PRECISIONS), value=precision, label="Precision")
                streaming = gr.Checkbox(False, label="Streaming", info="causal: each depth sees only past frames")
                start = gr.Button("Compute depth", variant="primary", elem_id="compute")
        pair = gr.Video(label="Source | depth", interactive=False, autoplay=True, loop=True, elem_id="pair")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=2):
                plot = gr.Image(label="Depth of one frame", show_label=False, type="numpy", interactive=False,
                                format="png", elem_id="plot")
            with gr.Column(scale=1):
                frame = gr.Slider(0, limits.max_len - 1, value=0, step=1, label="Frame")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False)
        sample.click(lambda: SAMPLE_VIDEO, outputs=video, api_visibility="private", queue=False)
        start.click(run, inputs=[video, size, max_len, precision_choice, streaming, frame],
                    outputs=[pair, status, downloads, frame, plot], api_name="depth",
                    show_progress_on=pair)
        frame.release(plot_frame, inputs=[downloads, frame], outputs=plot, api_name="plot", concurrency_limit=None)
    return demo


@contextlib.contextmanager
def running(model: VideoDepthAnything, input_size: int, limits: Limits, *, precision: str, about: str = "",
            host: str = "127.0.0.1", port: int = 7860) -> Iterator:
    """The page (``build``) served by background threads while the block runs; then stopped, and every
    upload and output removed.

    One request computes at a time (the queue); uploads over ``limits.max_upload_mb`` are
    refused. Gradio keeps uploads and served outputs in a temporary folder of this server's
    own (``GRADIO_TEMP_DIR`` while it runs), the requests their work folders beside it, all
    removed as the block ends, by a stop signal too.

    Raises:
      ValueError: the server cannot listen on ``host:port`` (``check_address`` says why).
    """
    check_address(host, port)
    previous = os.environ.get("GRADIO_TEMP_DIR")
    with tempfile.TemporaryDirectory(prefix="vda-jax-demo-") as root:
        # Gradio's cache and the requests' folders apart: Gradio serves only the outputs it copied in.
        cache, scratch = os.path.join(root, "gradio"), os.path.join(root, "requests")
        os.mkdir(cache)
        os.mkdir(scratch)
        os.environ["GRADIO_TEMP_DIR"] = cache  # read as the page's components are made
        try:
            page = build(model, input_size, limits, precision=precision, about=about, scratch=scratch)
            page.queue(default_concurrency_limit=1)
            try:
                page.launch(server_name=host, server_port=port, max_file_size=limits.max_upload_bytes,
                            allowed_paths=[SAMPLE_VIDEO], show_error=True, prevent_thread_lock=True, quiet=True)
            except OSError:  # taken since check_address (Gradio's message names its own settings)
                raise ValueError(f"--port {port} is in use on {host}; choose another with --port") from None
            try:
                yield page
            finally:
                page.close(verbose=False)
        finally:
            if previous is None:
                del os.environ["GRADIO_TEMP_DIR"]
            else:
                os.environ["GRADIO_TEMP_DIR"] = previous


def serve_until_stopped(page) -> None:
    """Blocks while ``page`` is served; a stop signal (KeyboardInterrupt) ends it, and ``running`` cleans up."""
    while page.is_running:
        time.sleep(0.1)
