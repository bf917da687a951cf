"""The official checkpoints by name: downloaded from the Hugging Face Hub, verified, converted once.

``PRETRAINED`` maps each name (``vits``, ``metric-vitl``, ``dav2-vitb``, ...) to its Hub
repository, file, licence and architecture. ``model_dir(name)``:

1. downloads the ``.pth`` with ``huggingface_hub`` (its cache, resumed downloads, progress
   bar, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``); with no connection it falls back
   to the cached file;
2. reads the file's sha256 from the name of its blob in the Hub cache (the Hub's ETag of an
   LFS file is its sha256), so a cached model is found without hashing or the network;
3. the first time, checks the file against that sha256 (a corrupted download is removed, so
   the next run fetches it again) and converts it into the model cache::

       $VDA_JAX_MODELS_DIR (default ~/.cache/vda-jax/models)/<owner>--<repo>/<file stem>-<sha256[:16]>/

   a model directory written atomically, whose ``config.json`` records where it came from
   (``pretrained``: repository, file, revision asked for, commit, sha256).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import pathlib
import re
import shutil
import sys

import huggingface_hub
import jax
import jax.numpy as jnp
from filelock import FileLock
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from jax.experimental import multihost_utils

from vda_jax.config import ModelConfig, model_config
from vda_jax.models.layers import Dtype
from vda_jax.models.vda import VideoDepthAnything

DIR_ENV = "VDA_JAX_MODELS_DIR"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
    """One official checkpoint on the Hub.

    Attributes:
      name: what ``--model`` takes.
      repo_id, filename: where the ``.pth`` lives on the Hub.
      licence: its licence (SPDX identifier), from the official README.
      config: the architecture of the converted model.
      parameters: of the released checkpoint (float32: 4 bytes each to download).
      kind: what the model gives, in a few words.
    """

    name: str
    repo_id: str
    filename: str
    licence: str
    config: ModelConfig
    parameters: int
    kind: str

    @property
    def non_commercial(self) -> bool:
        return "-NC-" in self.licence

    @property
    def url(self) -> str:
        """The file's download address (on ``HF_ENDPOINT`` when set)."""
        return huggingface_hub.hf_hub_url(self.repo_id, self.filename)


def _official() -> dict[str, PretrainedModel]:
    sizes = {"vits": ("Small", "Apache-2.0"), "vitb": ("Base", "CC-BY-NC-4.0"), "vitl": ("Large", "CC-BY-NC-4.0")}
    # Parameters of the official modules (tests/fixtures/official_shapes.json.gz); the image
    # models are the video models without the temporal layers.
    video_params = {"vits": 29_035_137, "vitb": 114_441_409, "vitl": 384_390_337}
    temporal_params = {"vits": 4_250_048, "vitb": 16_970_624, "vitl": 49_074_688}
    kinds = [  # name prefix, repository and file prefixes, metric, image model, what it gives
        ("", "Video-Depth-Anything", "video_depth_anything", False, False, "video, relative depth"),
        ("metric-", "Metric-Video-Depth-Anything", "metric_video_depth_anything", True, False, "video, metric depth"),
        ("dav2-", "Depth-Anything-V2", "depth_anything_v2", False, True, "image model (training init)"),
    ]
    entries = [PretrainedModel(f"{prefix}{encoder}", f"depth-anything/{repo}-{size}", f"{file}_{encoder}.pth",
                               licence, model_config(encoder + ("-metric" if metric else "")),
                               video_params[encoder] - (temporal_params[encoder] if image else 0), kind)
               for prefix, repo, file, metric, image, kind in kinds for encoder, (size, licence) in sizes.items()]
    return {entry.name: entry for entry in entries}


# Name -> checkpoint. Add entries to serve other checkpoints by name (the tests serve tiny ones).
PRETRAINED: dict[str, PretrainedModel] = _official()


class PretrainedError(OSError):
    """A named checkpoint could not be downloaded or failed its check; the message says what to do."""


def lookup(name: str) -> PretrainedModel:
    """The entry of ``name``; a ``ValueError`` listing the names if there is none."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown model {name!r}; the names are {', '.join(PRETRAINED)} (`vda-jax models` "
                         "lists them)")
    return PRETRAINED[name]


def models_dir() -> str:
    """Where converted models are cached: ``$VDA_JAX_MODELS_DIR`` or ``~/.cache/vda-jax/models``."""
    return os.environ.get(DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vda-jax", "models")


def _repo_dir(entry: PretrainedModel) -> str:
    return os.path.join(models_dir(), entry.repo_id.replace("/", "--"))


def _converted_dir(entry: PretrainedModel, sha256: str) -> str:
    return os.path.join(_repo_dir(entry), f"{pathlib.PurePosixPath(entry.filename).stem}-{sha256[:16]}")


def _fetch(entry: PretrainedModel, revision: str | None) -> str:
    """The ``.pth`` in the Hub cache, downloaded if needed (not verified: see ``_verify``)."""
    cached = huggingface_hub.try_to_load_from_cache(entry.repo_id, entry.filename, revision=revision)
    if entry.non_commercial and not isinstance(cached, str) and not hub_constants.HF_HUB_OFFLINE:
        print(f"{entry.name}: the weights in {entry.repo_id} are licensed {entry.licence}, for non-commercial use "
              "only", file=sys.stderr)
    at = f"{entry.filename} in {entry.repo_id} at revision {revision or 'main'}"
    try:
        return huggingface_hub.hf_hub_download(entry.repo_id, entry.filename, revision=revision)
    except LocalEntryNotFoundError as e:  # no connection (or offline mode, or a server error) and not cached
        raise PretrainedError(f"{entry.filename} is not in the cache and cannot be downloaded "
                              f"({_why_unreachable(e)}); {_by_hand(entry)}") from e
    except HfHubHTTPError as e:  # the Hub answered: no such repository, revision or file, or no access
        status = e.response.status_code if e.response is not None else None
        if status == 404:
            raise PretrainedError(f"the Hub has no {at} (it answered 404)") from e
        if status in (401, 403):
            raise PretrainedError(f"the Hub refused {at} ({status}): set HF_TOKEN to a token with access") from e
        raise PretrainedError(f"the Hub answered {status} for {at}; run again later, or {_by_hand(entry)}") from e
    except Exception as e:  # a download cut short (its size differs from the Hub's), a lost connection, a full disk
        raise PretrainedError(f"downloading {entry.url} failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              f"run again to download it again, or {_by_hand(entry)}") from e


def _by_hand(entry: PretrainedModel) -> str:
    """The manual route: download, convert, ``--checkpoint``."""
    return (f"download {entry.url} yourself, run `vda-jax convert {entry.filename} DIR"
            f"{' --metric' if entry.config.metric else ''}` and pass --checkpoint DIR")


def _why_unreachable(error: LocalEntryNotFoundError) -> str:
    if hub_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    cause = error.__cause__
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        return f"the server answered {cause.response.status_code}"
    return "no connection to the Hub"


def _blob_sha256(path: str) -> str | None:
    """The Hub's sha256 of a cached file: the name of the blob its snapshot entry links to."""
    name = os.path.basename(os.path.realpath(path))
    return name if _SHA256.fullmatch(name) else None  # None: not an LFS file, or a cache without symlinks


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _verify(entry: PretrainedModel, path: str, expected: str | None) -> str:
    """The file's sha256; a corrupted file is removed from the Hub cache (the next run fetches it again)."""
    actual = _file_sha256(path)
    if expected is not None and actual != expected:
        blob = os.path.realpath(path)
        for file in {path, blob}:
            os.remove(file)
        raise PretrainedError(f"{entry.filename} from {entry.repo_id} is corrupted (sha256 {actual[:12]}..., the "
                              f"Hub's is {expected[:12]}...); removed it: run again to download it again")
    return actual


def download(name: str, *, revision: str | None = None) -> str:
    """The verified official ``.pth`` of ``name`` in the Hub cache (for ``init_from``, say)."""
    entry = lookup(name)
    path = _fetch(entry, revision)
    _verify(entry, path, _blob_sha256(path))
    return path


def model_dir(name: str, *, revision: str | None = None) -> str:
    """The converted model directory of ``name``: downloaded and converted the first time, then cached.

    In a multi-process job every process calls this; process 0 converts, into a model cache
    that every process must see (as the shared ``--output-dir`` of ``vda-jax infer``).

    Args:
      name: a key of ``PRETRAINED`` (``vda-jax models`` lists them).
      revision: the Hub branch, tag or commit (default ``main``).
    Raises:
      ValueError: an unknown name.
      PretrainedError: the file cannot be had (offline and not cached, not on the Hub) or is corrupted.
    """
    entry = lookup(name)
    # Before any lock: the processes of a multi-process job start their backends together.
    primary, processes = jax.process_index() == 0, jax.process_count()
    path = _fetch(entry, revision)
    expected = _blob_sha256(path)
    sha256 = expected or _file_sha256(path)
    target = _converted_dir(entry, sha256)
    if primary and not _complete(target):
        os.makedirs(_repo_dir(entry), exist_ok=True)
        with FileLock(target + ".lock"):  # one conversion at a time; the others then find it done
            if not _complete(target):
                _convert(entry, path, expected, target, revision)
    if processes > 1:
        multihost_utils.sync_global_devices(f"converted {target}")
        if not _complete(target):
            raise PretrainedError(f"process 0 converted {name} into {target}, which this process does not see; "
                                  f"set {DIR_ENV} to a folder every process sees")
    return target


def _complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "config.json"))  # model directories appear whole


def _convert(entry: PretrainedModel, path: str, expected: str | None, target: str, revision: str | None) -> None:
    """Checks the downloaded ``path`` and converts it into ``target``, recording where it came from."""
    from vda_jax.convert.convert import convert_checkpoint

    sha256 = _verify(entry, path, expected)
    for stale in glob.glob(os.path.join(_repo_dir(entry), f".{os.path.basename(target)}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion
    commit = pathlib.Path(path).parents[len(pathlib.PurePosixPath(entry.filename).parts) - 1].name
    provenance = {"name": entry.name, "repo_id": entry.repo_id, "filename": entry.filename,
                  "revision": revision or "main", "commit": commit, "sha256": sha256}
    convert_checkpoint(path, target, config=entry.config, metadata={"pretrained": provenance})


def from_pretrained(name: str, *, revision: str | None = None, dtype: Dtype = jnp.float32) -> VideoDepthAnything:
    """The official model ``name``, ready to run: ``model(frames [B, T, H, W, 3]) -> [B, T, H, W]``.

    Downloaded and converted the first time (see ``model_dir``); ``dtype`` is the compute dtype.
    """
    from vda_jax.checkpoint import load_checkpoint

    return load_checkpoint(model_dir(name, revision=revision), dtype=dtype)


def cache_state(entry: PretrainedModel) -> str:
    """"converted" (a converted model is cached), "downloaded" (only the .pth) or ""."""
    prefix = os.path.join(_repo_dir(entry), f"{pathlib.PurePosixPath(entry.filename).stem}-")
    if any(_complete(d) for d in glob.glob(glob.escape(prefix) + "*")):
        return "converted"
    return "downloaded" if isinstance(huggingface_hub.try_to_load_from_cache(entry.repo_id, entry.filename),
                                      str) else ""


def format_table() -> str:
    """``vda-jax models``: every name with its size, licence and whether it is cached."""
    header = ("name", "kind", "parameters", "download", "licence", "cached")
    rows = [header] + [(e.name, e.kind, f"{e.parameters / 1e6:.1f} M", f"{e.parameters * 4 / 1e6:,.0f} MB",
                        e.licence, cache_state(e)) for e in PRETRAINED.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ["", f"converted models: {models_dir()} (${DIR_ENV}); downloads: huggingface_hub's "
                                  f"cache ({hub_constants.HF_HUB_CACHE})"])
