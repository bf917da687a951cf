"""The long-video driver: lazy frames in, final depths out, many videos per compiled step.

Memory is constant in the video's length: frames are pulled from their source
as the windows need them (decoded ahead by a background thread), and each depth
frame leaves as soon as it is final. Videos that share a frame size share one
compiled window step with a slot axis; a slot whose video ends takes the next
video, and the slots are sharded over every device on a ``data`` mesh axis.
Steps are dispatched before the previous step's depths are copied back, so the
host decodes and writes while the device computes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence, Sized
from typing import NamedTuple, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vda_jax import executables, interrupts
from vda_jax.inference import window
from vda_jax.inference.preprocess import network_size
from vda_jax.models.vda import VideoDepthAnything, compute_model, with_options
from vda_jax.xla_options import compiler_options

_PREFETCH_FRAMES = 2 * window.WINDOW_FRAMES
_ALIGNMENT = 64  # XLA:CPU's buffer alignment


class DepthSink(Protocol):
    """Receives one video's depths in order: ``write([n, H, W])`` calls, then ``close()``."""

    def write(self, depth: np.ndarray) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class VideoJob:
    """A video to process: its uint8 RGB frames ``[H, W, 3]`` (any iterable) and where depths go."""

    frames: Iterable[np.ndarray]
    sink: DepthSink
    name: str = "video"


def _prefetch(frames: Iterable[np.ndarray], name: str, depth: int = _PREFETCH_FRAMES) -> Generator[np.ndarray]:
    """Iterates ``frames`` in a background thread, ``depth`` frames ahead; re-raises its errors here.

    The thread owns ``frames``: it closes them when done, and closing this
    generator (or an exception here, Ctrl-C included) stops the thread and waits
    for it, so nothing touches ``frames`` afterwards.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                buffer.put(item, timeout=0.05)
                return True
        return False

    def fill():
        iterator = iter(frames)
        try:
            for frame in iterator:
                if not put(np.ascontiguousarray(frame, dtype=np.uint8)):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)
        finally:
            if hasattr(iterator, "close"):
                iterator.close()

    thread = threading.Thread(target=fill, daemon=True, name=f"decode-{name}")
    try:
        with interrupts.held():  # else Ctrl-C could cut start() short with the thread running and never stopped
            thread.start()
        while (item := buffer.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        if thread.ident is not None:  # started
            thread.join()


class _Slot:
    """Host-side progress of the video in one slot."""

    def __init__(self, index: int, job: VideoJob, frame_size: tuple[int, int]):
        self.index, self.job, self.frame_size = index, job, frame_size
        self.frames = _prefetch(job.frames, job.name)
        self.read = 0          # real frames read so far
        self.window = 0        # windows dispatched
        self.last: np.ndarray | None = None
        self.failed = False

    def close(self) -> None:
        """Stops reading (the decode thread ends before this returns)."""
        self.frames.close()

    def fill_window(self, inputs: np.ndarray) -> int:
        """Writes the slot's next window's inputs into ``inputs`` (``[32, H, W, 3]``); returns how
        many of them are real frames.

        A video's first window reads 32 frames; a later one reads its 22 new frames into
        ``inputs[10:]`` and leaves the first 10 as they are (never read: those inputs'
        features are carried).
        """
        start = 0 if self.window == 0 else window.OVERLAP_FRAMES
        return start + self.take(inputs[start:])

    def take(self, out: np.ndarray) -> int:
        """Writes the next ``len(out)`` frames into ``out`` (the last real frame repeated once the
        video has ended); returns how many of them are real."""
        real = 0
        for frame in itertools.islice(self.frames, len(out)):
            if frame.shape != (*self.frame_size, 3):
                raise ValueError(f"{self.job.name}: frame {self.read} is {frame.shape}, expected "
                                 f"{(*self.frame_size, 3)}; all frames of a video must share one size")
            out[real], self.last = frame, frame
            real += 1
            self.read += 1
        if self.last is None:
            raise ValueError(f"{self.job.name}: the video has no frames")
        out[real:] = self.last
        return real

    @property
    def has_next_window(self) -> bool:
        # The window starting at frame 22 * w exists iff that frame exists.
        return window.STRIDE * self.window < self.read


def slot_mesh(slots: int, devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
    """A ``data`` mesh over as many of ``devices`` as there are slots."""
    shards = min(slots, len(devices))
    return jax.make_mesh((shards,), ("data",), devices=list(devices)[:shards],
                         axis_types=(jax.sharding.AxisType.Auto,))


def padded_slots(slots: int, mesh: jax.sharding.Mesh) -> int:
    """``slots`` rounded up to a multiple of the mesh's devices (the extra slots stay idle)."""
    return -(-slots // mesh.size) * mesh.size


class WindowPrograms:
    """A window step as two compiled programs: ``window.encode_window`` and ``window.decode_window``.

    Each program is compiled on a thread of its own as soon as it is lowered (XLA does not
    hold Python's lock while it compiles): the encoder's first, whose compile then runs
    beside the head's lowering (Python, one core), and the head's, the longest, beside the
    first window's encoder. ``encode`` and ``decode`` wait for their compile.
    """

    def __init__(self, encode: concurrent.futures.Future, decode: concurrent.futures.Future):
        self._encode, self._decode = encode, decode

    @property
    def encode(self) -> jax.stages.Compiled:
        """The encoder's program (waits for its compile; raises its error)."""
        return self._encode.result()

    @property
    def decode(self) -> jax.stages.Compiled:
        """The head's program (waits for its compile; raises its error)."""
        return self._decode.result()


def jitted_window_programs(graphdef: nnx.GraphDef, frame_size: tuple[int, int], net_size: tuple[int, int],
                           mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
    """The jitted ``window.encode_window`` and ``window.decode_window`` (slots sharded on ``data``)."""
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def merged(params):
        model = nnx.merge(graphdef, params)
        if mesh.size > 1:  # the per-frame chunks take frames from every device at once
            model = with_options(model, frame_sharding=sharded)
        return model

    def encode(params, frames, first, real):
        return window.encode_window(merged(params), frames, first, real, net_size)

    def decode(params, state, encoded, first, real):
        return window.decode_window(merged(params), state, encoded, first, real, frame_size, net_size)

    options = compiler_options()
    return (jax.jit(encode, in_shardings=(replicated, sharded, sharded, sharded), out_shardings=sharded,
                    compiler_options=options),
            jax.jit(decode, in_shardings=(replicated, sharded, sharded, sharded, sharded),
                    out_shardings=(sharded, sharded), donate_argnums=1, compiler_options=options))


class WindowInputs(NamedTuple):
    """Shapes of the window programs' arguments for some number of slots (``B``)."""

    state: window.WindowState
    encoded: tuple[jax.ShapeDtypeStruct, ...]  # window.encode_window's output, four [B, 32, ph, pw, E]
    frames: jax.ShapeDtypeStruct  # uint8 [B, 32, H, W, 3]
    first: jax.ShapeDtypeStruct  # bool [B]
    real: jax.ShapeDtypeStruct  # int32 [B]


def window_inputs(graphdef: nnx.GraphDef, params: nnx.State, frame_size: tuple[int, int],
                  net_size: tuple[int, int], slots: int) -> WindowInputs:
    """The shapes of the window programs' arguments for ``slots`` videos of ``frame_size``."""
    model = nnx.merge(graphdef, params)
    state = jax.eval_shape(lambda: window.empty_state(model, slots, net_size, frame_size))
    encoded = tuple(jax.ShapeDtypeStruct((slots, window.WINDOW_FRAMES, *f.shape[2:]), f.dtype)
                    for f in state.key_features)
    return WindowInputs(state, encoded, jax.ShapeDtypeStruct((slots, window.WINDOW_FRAMES, *frame_size, 3), np.uint8),
                        jax.ShapeDtypeStruct((slots,), np.bool_), jax.ShapeDtypeStruct((slots,), np.int32))


ParamShapes = tuple[jax.tree_util.PyTreeDef, tuple[jax.ShapeDtypeStruct, ...]]  # hashable: a cache key


def param_shapes(params: nnx.State) -> ParamShapes:
    """The structure and leaf shapes of ``params``, the part of them a compiled program depends on."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef: nnx.GraphDef, signature: ParamShapes, frame_size: tuple[int, int],
              net_size: tuple[int, int], slots: int, mesh: jax.sharding.Mesh) -> WindowPrograms:
    """The window programs for one model graph and parameter shapes, frame size and slot count (a
    multiple of the mesh's devices); built once: every window of every video of the size runs them.
    Programs a process stored before are loaded (``executables``) instead of traced and compiled."""
    params = jax.tree.unflatten(*signature)
    model = nnx.merge(graphdef, params)
    description = (model.config, model.options(), signature, frame_size, net_size, slots, mesh.axis_names,
                   mesh.devices.shape, compiler_options())
    types = {node.type for node in graphdef.nodes if hasattr(node, "type")}
    encode_entry, decode_entry = (executables.key((name, *description), tuple(mesh.devices.flat), types)
                                  for name in ("window-encode", "window-decode"))
    encode, decode = jitted_window_programs(graphdef, frame_size, net_size, mesh)
    shapes = window_inputs(graphdef, params, frame_size, net_size, slots)
    # The encoder first: its compile runs beside the head's lowering, which is Python on one core.
    encoder = executables.load_or_start_compile(
        encode_entry, lambda: encode.lower(params, shapes.frames, shapes.first, shapes.real))
    head = executables.load_or_start_compile(
        decode_entry, lambda: decode.lower(params, shapes.state, shapes.encoded, shapes.first, shapes.real))
    return WindowPrograms(encoder, head)


class WindowRunner:
    """The compiled window programs for one frame size and slot count.

    The slots are split over as many of ``devices`` (default: this process's, so processes run
    independently) as there are slots, and padded to a multiple of that count with idle slots.
    The model's parameters are placed once (replicated over the mesh); the slot axis of the
    frames and of the carried state is sharded on ``data``.
    """

    def __init__(self, model: VideoDepthAnything, frame_size: tuple[int, int], net_size: tuple[int, int],
                 slots: int, devices: Sequence[jax.Device] | None = None):
        mesh = slot_mesh(slots, devices or jax.local_devices())
        self.frame_size, self.net_size, self.slots = frame_size, net_size, padded_slots(slots, mesh)
        graphdef, params = nnx.split(model)
        self.params = jax.device_put(params, NamedSharding(mesh, P()))
        self.programs = _compiled(graphdef, param_shapes(params), frame_size, net_size, self.slots, mesh)
        state = window.empty_state(model, self.slots, net_size, frame_size)
        self.state = jax.device_put(state, NamedSharding(mesh, P("data")))

    def step(self, frames: np.ndarray, first: np.ndarray, real: np.ndarray) -> jax.Array:
        """Runs one window of every slot (``WindowPrograms``); returns its depths without waiting for them."""
        encoded = self.programs.encode(self.params, frames, first, real)
        self.state, out = self.programs.decode(self.params, self.state, encoded, first, real)
        return out


def _raise(job: VideoJob, error: Exception) -> None:
    raise error


def _run_group(runner: WindowRunner, jobs: Iterator[VideoJob], on_frames: Callable[[int], None],
               on_error: Callable[[VideoJob, Exception], None] = _raise) -> None:
    """Runs every job (all of ``runner.frame_size``) through the runner's slots.

    A video whose frames cannot be read is handed to ``on_error`` (which re-raises by
    default) and its slot moves on to the next video. However this ends, every
    decode thread has ended when it returns.
    """
    slots: list[_Slot | None] = [None] * runner.slots
    counter = itertools.count()

    def fail(i: int, error: Exception) -> None:
        slots[i].failed = True
        slots[i].close()  # before on_error, which may close the job's frames
        on_error(slots[i].job, error)
        assign(i)

    def assign(i: int) -> None:
        if slots[i]:
            slots[i].close()
        slots[i] = None
        if (job := next(jobs, None)) is not None:
            slots[i] = _Slot(next(counter), job, runner.frame_size)  # starts decoding it

    def next_frames(i: int, inputs: np.ndarray) -> int:
        while slots[i]:
            try:
                return slots[i].fill_window(inputs)
            except (ValueError, OSError) as e:
                fail(i, e)
        return 0  # an idle slot: its inputs are not read

    try:
        for i in range(runner.slots):
            assign(i)
        _run_slots(runner, slots, assign, next_frames, on_frames)
    finally:
        for slot in slots:
            if slot:
                slot.close()


def _run_slots(runner: WindowRunner, slots: list[_Slot | None], assign: Callable[[int], None],
               next_frames: Callable[[int, np.ndarray], int], on_frames: Callable[[int], None]) -> None:
    """Steps until every slot is empty, collecting each step's depths while the next one runs.

    The frames go into two host buffers in turn: a step may read its buffer until it is done
    (on CPU devices it reads it in place, ``aligned_zeros``), and the step two back is
    collected before a buffer is filled again.
    """
    buffers = [aligned_zeros((runner.slots, window.WINDOW_FRAMES, *runner.frame_size, 3), np.uint8)
               for _ in range(2)]
    in_flight = None  # (output, [(slot index, slot, window index, ended)]) of the last dispatched step
    while any(slots) or in_flight:
        dispatched = None
        if any(slots):
            buffers.reverse()
            inputs = buffers[0]
            real = [next_frames(i, inputs[i]) for i in range(runner.slots)]  # may move a slot on
            first = np.array([bool(s) and s.window == 0 for s in slots])
            out = runner.step(inputs, first, np.array(real, np.int32))
            info = []
            for i, s in enumerate(slots):
                if s:
                    s.window += 1
                    info.append((i, s, s.window - 1, not s.has_next_window))
            dispatched = (out, info)
            for i, _, _, ended in info:
                if ended:
                    assign(i)  # the next video's first frames go in while this step runs
        if in_flight:
            _collect(*in_flight, on_frames)
        in_flight = dispatched


def aligned_zeros(shape: tuple[int, ...], dtype: np.typing.DTypeLike) -> np.ndarray:
    """Zeros whose data starts on a 64-byte boundary.

    A CPU device reads such an array in place when a jitted step is called with it, where
    it copies any other into a buffer of its own: for a 720p window 88 MB a step, fresh
    pages each time (about 60 ms on a 2-core VM).
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(size + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def _collect(out: jax.Array, info, on_frames: Callable[[int], None]) -> None:
    """Copies a step's depths to the host and hands each slot's final frames to its sink."""
    depths = np.asarray(out)  # [slots, 32, H, W], laid out as the window module describes
    for i, slot, w, ended in info:
        if slot.failed:
            continue
        start = window.STRIDE * w
        first = 0 if w == 0 else window.ALIGN_FRAMES
        last = window.WINDOW_FRAMES if ended else window.FINAL_END
        keep = min(last, slot.read - start) - first  # drop the padding past the end
        if keep > 0:
            slot.job.sink.write(depths[i, first:first + keep])
            on_frames(keep)
        if ended:
            slot.job.sink.close()


def _peek(frames: Iterable[np.ndarray], name: str) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"{name}: the video has no frames")
    first = np.asarray(first)
    if first.ndim != 3 or first.shape[-1] != 3 or first.dtype != np.uint8:
        raise ValueError(f"{name}: frames must be uint8 RGB [H, W, 3], got {first.dtype} {first.shape}")
    return first, itertools.chain([first], iterator)


def run_videos(model: VideoDepthAnything, frame_size: tuple[int, int], jobs: Iterable[VideoJob], *,
               input_size: int = 518, precision: str | None = None, slots: int = 1,
               on_frames: Callable[[int], None] = lambda n: None,
               on_error: Callable[[VideoJob, Exception], None] = _raise,
               devices: Sequence[jax.Device] | None = None) -> None:
    """Depth for videos that all have ``frame_size``, ``slots`` at a time through one compiled step.

    ``jobs`` is consumed lazily (a video is opened when a slot takes it), so any
    number of videos runs in constant memory; each job's sink receives its depths
    ``[n, H, W]`` in order. A video that fails to read goes to ``on_error``
    (default: raise) and the others go on. The slots are split over ``devices``
    (default: this process's), whose platform sets the defaults of ``compute_model``.
    """
    devices = list(devices or jax.local_devices())
    model = compute_model(model, precision, devices=devices)
    runner = WindowRunner(model, frame_size, network_size(frame_size, input_size), slots, devices)
    _run_group(runner, iter(jobs), on_frames, on_error)


def infer_videos(model: VideoDepthAnything, jobs: Sequence[VideoJob], *, input_size: int = 518,
                 precision: str | None = None, batch_size: int = 1,
                 on_frames: Callable[[int], None] = lambda n: None,
                 on_error: Callable[[VideoJob, Exception], None] = _raise) -> None:
    """Depth for videos of any frame sizes: grouped by size, ``batch_size`` videos per step.

    Results equal one-by-one inference. Each video's first frame is read up front
    to group them; for very many files, group by header and call ``run_videos``.
    """
    groups: dict[tuple[int, int], list[VideoJob]] = {}
    for job in jobs:
        try:
            first, frames = _peek(job.frames, job.name)
        except (ValueError, OSError) as e:
            on_error(job, e)
            continue
        groups.setdefault(first.shape[:2], []).append(dataclasses.replace(job, frames=frames))
    for frame_size, group in groups.items():
        run_videos(model, frame_size, group, input_size=input_size, precision=precision,
                   slots=min(batch_size, len(group)), on_frames=on_frames, on_error=on_error)


class _ListSink:
    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def write(self, depth: np.ndarray) -> None:
        self.chunks.append(depth)

    def close(self) -> None:
        pass

    def result(self) -> np.ndarray:
        return np.concatenate(self.chunks)


class _ArraySink:
    """Copies each window's depths into one ``[num_frames, H, W]`` array as they come, so a
    window's output buffer is freed as soon as it is read and nothing is joined at the end."""

    def __init__(self, num_frames: int):
        self.num_frames, self.written = num_frames, 0
        self.depth: np.ndarray | None = None

    def write(self, depth: np.ndarray) -> None:
        if self.depth is None:
            self.depth = np.empty((self.num_frames, *depth.shape[1:]), depth.dtype)
        self.depth[self.written:self.written + len(depth)] = depth
        self.written += len(depth)

    def close(self) -> None:
        pass

    def result(self) -> np.ndarray:
        return self.depth


def infer_video_depth(model: VideoDepthAnything, frames: np.ndarray | Iterable[np.ndarray], *,
                      input_size: int = 518, precision: str | None = None) -> np.ndarray:
    """Consistent depth of a whole video, as the official ``infer_video_depth``.

    Args:
      model: a loaded model (relative or metric).
      frames: uint8 RGB ``[N, H, W, 3]`` or an iterable of ``[H, W, 3]`` frames.
      input_size: short side of the network input (rounded to a multiple of 14).
      precision: "fp32", "tf32" or "bf16" (default: bf16 on accelerators, fp32 on CPU).
    Returns:
      float32 depth ``[N, H, W]`` at the frames' resolution.
    """
    sink = _ArraySink(len(frames)) if isinstance(frames, Sized) else _ListSink()
    infer_videos(model, [VideoJob(frames, sink)], input_size=input_size, precision=precision)
    return sink.result()
