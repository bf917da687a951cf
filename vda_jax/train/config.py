"""Training configuration: the schema with its defaults, config files and ``key=value`` overrides.

A config file is a Python file whose ``get_config()`` returns ``default_config()`` with some
fields changed (see ``configs/train/``). Every field is listed here, with its meaning, so a
config can only set fields that exist and overrides are type-checked against them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.resources
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

from ml_collections import config_dict

from vda_jax.checkpoint import FORMAT as MODEL_FORMAT
from vda_jax.config import ENCODERS, ModelConfig, model_config
from vda_jax.data.builders import SyntheticConfig
from vda_jax.data.layouts import SPLITS
from vda_jax.data.pipeline import DataConfig, clip_index
from vda_jax.data.synthetic import SCENE_KINDS
from vda_jax.inference.window import WINDOW_FRAMES
from vda_jax.precision import check_precision
from vda_jax.pretrained import PRETRAINED
from vda_jax.train.optimizer import learning_rates
from vda_jax.train.sharding import TENSOR_RULES


def default_config() -> config_dict.ConfigDict:
    """Every training setting with its default."""
    c = config_dict.ConfigDict()
    c.seed = 0  # parameters of a model trained from scratch, and the data order
    # The architecture: {"name": "vits" | "vitb" | "vitl" | "vitg" (optionally "-metric")}, or
    # {"name": "custom", **ModelConfig fields}. A checkpoint given in init_from must match it.
    c.model = config_dict.ConfigDict({"name": "vits"})
    # Initial weights: "" (random), a vda-jax model directory, an official Video Depth
    # Anything / Depth Anything V2 .pth or .safetensors file (image models get identity
    # temporal layers), or the name of one (`vda-jax models`: dav2-vitl, ...), downloaded from
    # the Hugging Face Hub. Only used when the workdir holds no checkpoint yet.
    c.init_from = ""
    # Compute precision, "fp32", "tf32" or "bf16" (vda_jax.precision); parameters stay float32.
    c.precision = "fp32"
    c.train_encoder = False  # False: only the head trains and the encoder runs outside autodiff
    # Rematerialise per module (temporal layers, fusion blocks, chunks of the head's per-frame end,
    # ViT blocks when the encoder trains): activations are recomputed in the backward pass.
    c.remat = False
    # Frames per device the per-frame parts (encoder, the head's finest layers) take at a time;
    # 0: all at once. With remat this bounds the backward pass's live activations too.
    c.frames_per_chunk = 0

    c.total_steps = 10_000
    c.batch_size = 16  # video clips per step, over all processes
    c.image_batch_size = 16  # images per image batch (data.image_ratio > 0), over all processes

    c.optimizer = config_dict.ConfigDict(dict(
        lr=1e-4,  # peak learning rate of the head
        temporal_lr=config_dict.placeholder(float),  # the temporal layers' (None: lr)
        encoder_lr=1e-5,  # the encoder's, when train_encoder
        warmup_steps=500,  # linear warm-up from 0, then cosine decay to end_lr_ratio * peak
        end_lr_ratio=0.0,
        weight_decay=0.01,  # decoupled (AdamW), on kernels only
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=1.0,  # global gradient norm clip (0: off)
    ))
    c.loss = config_dict.ConfigDict(dict(
        alpha=0.5,  # weight of the spatial gradient matching term
        scales=4,  # its number of scales
        trim=0.0,  # fraction of the largest residuals dropped
        stable_scale=10.0,  # weight of the temporal gradient matching term
        # Equal groups of clips whose losses are computed apart and averaged, as the official
        # per-GPU loss; data x fsdp trims (sorts) on each device instead of over the batch.
        clip_groups=1,
    ))
    # The input pipeline (vda_jax.data.pipeline.DataConfig without the batch sizes and seed,
    # which come from above).
    defaults = DataConfig()
    c.data = config_dict.ConfigDict(dict(
        video_dataset=defaults.video_dataset,
        video_split=defaults.video_split,
        image_dataset=config_dict.placeholder(str),
        image_split=defaults.image_split,
        data_dir=config_dict.placeholder(str),  # None: TFDS's default, or workdir/data for `synthetic`
        clip_frames=defaults.clip_frames,
        clip_stride=defaults.clip_stride,
        clip_hop=defaults.clip_hop,
        crop_size=defaults.crop_size,
        max_scale=defaults.max_scale,
        flip_prob=defaults.flip_prob,
        color_jitter=defaults.color_jitter,
        image_ratio=defaults.image_ratio,
        read_threads=defaults.read_threads,
        prefetch_batches=defaults.prefetch_batches,
    ))
    # Renders this synthetic dataset (vda_jax.data.builders.SyntheticConfig fields, with its
    # `name`) into data_dir before training, once; data.video_dataset must be
    # "vda_synthetic/<name>". None: use prepared datasets only.
    c.synthetic = config_dict.placeholder(config_dict.ConfigDict)

    # Devices: a (data, fsdp, tensor) mesh; -1 takes the devices left over.
    c.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = config_dict.ConfigDict(dict(
        # Arrays smaller than this stay replicated rather than fsdp-sharded.
        min_fsdp_size=2**14,
        # Split each batch over data x fsdp by frame (batch_size x data.clip_frames must divide
        # over them), not by clip (batch_size must): for more devices than clips. The temporal
        # layers then split spatial positions, with one all-to-all each way.
        split_frames=False,
        # (regex on the dotted variable path, mesh axis per dimension); first match wins.
        tensor_rules=TENSOR_RULES,
    ))

    c.eval = config_dict.ConfigDict(dict(
        every=1000,  # steps between evaluations (0: never)
        split="validation",  # of data.video_dataset
        max_batches=8,  # batches per evaluation (0: the whole split)
    ))
    c.checkpoint = config_dict.ConfigDict(dict(
        every=1000,  # steps between checkpoints (evaluations also checkpoint)
        keep=3,  # latest checkpoints kept, besides the best
        best_metric="val_abs_rel",  # an evaluation metric; its best checkpoint is kept
        best_mode="min",  # "min" or "max"
    ))
    c.log_every = 50
    c.progress_bar = True
    return c


def config_path(name: str) -> str:
    """The file of a ``--config`` value: a path, or the name of a shipped config (``synthetic_tiny``)."""
    if os.path.exists(name):
        return name
    shipped = importlib.resources.files("vda_jax.configs") / "train"
    if os.sep not in name and (shipped / name).is_file():
        return str(shipped / name)
    if os.sep not in name and (shipped / f"{name}.py").is_file():
        return str(shipped / f"{name}.py")
    names = sorted(f.name.removesuffix(".py") for f in shipped.iterdir() if f.name.endswith(".py")
                   and not f.name.startswith("_"))
    raise ValueError(f"config file {name} does not exist; give a path or a shipped config: {', '.join(names)}")


def load_config(path: str, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
    """Runs a config file's ``get_config()``, applies ``key=value`` overrides and validates the result.

    Args:
      path: a Python file or the name of a shipped config (``configs/train/NAME.py``);
        ``FILE:ARG`` calls ``get_config(ARG)`` (e.g. a model size).
      overrides: ``dotted.key=value`` items.

    Raises:
      ValueError: the file is missing, not Python or has no ``get_config``, an override names
        an unknown key or has a value of the wrong type, or a value is invalid (``validate``).
    """
    path, sep, arg = path.rpartition(":") if ":" in os.path.basename(path) else (path, "", "")
    path = config_path(path)
    spec = importlib.util.spec_from_file_location(f"_vda_train_config_{abs(hash(path))}", path)
    if not path.endswith(".py") or spec is None:
        raise ValueError(f"config file {path} is not a Python file; a config is a .py file defining get_config() "
                         "(see configs/train/)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    config = module.get_config(arg) if sep else module.get_config()
    if not isinstance(config, config_dict.ConfigDict):
        raise ValueError(f"{path}: get_config() must return an ml_collections ConfigDict, "
                         f"got {type(config).__name__}")
    config.lock()
    apply_overrides(config, overrides)
    validate(config)
    return config


def validate(config: config_dict.ConfigDict) -> None:
    """Checks every value that can be checked without data or devices, so a bad one fails at once.

    The model must cover the inference window (``WINDOW_FRAMES`` frames), so that every trained
    model runs through ``vda-jax infer``, ``eval`` and streaming, and the training clips.

    Raises:
      ValueError: naming the first invalid value.
    """
    c = config
    for key, ok, rule in _RANGES:
        value = _get(c, key)
        if value is not None and not ok(value):
            raise ValueError(f"{key} must be {rule}, got {value!r}")
    if c.checkpoint.best_mode not in ("min", "max"):
        raise ValueError(f"checkpoint.best_mode must be 'min' or 'max', got {c.checkpoint.best_mode!r}")
    if c.eval.every and c.checkpoint.best_metric not in (*LOSS_METRICS, *DEPTH_METRICS):
        raise ValueError(f"checkpoint.best_metric must be one of {[*LOSS_METRICS, *DEPTH_METRICS]}, got "
                         f"{c.checkpoint.best_metric!r}")
    check_precision(c.precision)
    learning_rates(c.optimizer, c.total_steps)  # checks the warm-up against total_steps
    model = model_config_from(c.model)
    if model.num_frames < WINDOW_FRAMES:
        raise ValueError(f"model.num_frames {model.num_frames} is below the {WINDOW_FRAMES}-frame inference window, "
                         f"so vda-jax infer could not run the model; set model.num_frames >= {WINDOW_FRAMES} "
                         "(training clips may be shorter)")
    if c.init_from in PRETRAINED and not os.path.exists(c.init_from):
        named = dataclasses.replace(PRETRAINED[c.init_from].config, metric=model.metric)
        if named != model:
            raise ValueError(f"init_from={c.init_from} holds a {named.encoder} model but model.name is "
                             f"{c.model.name!r}; set model.name={named.encoder}{'-metric' * model.metric}")
    if c.data.clip_frames > model.num_frames:
        raise ValueError(f"data.clip_frames {c.data.clip_frames} exceeds model.num_frames {model.num_frames}")
    DataConfig(**c.data.to_dict(), batch_size=c.batch_size, image_batch_size=c.image_batch_size, seed=c.seed)
    if c.synthetic is not None:
        _check_synthetic(c)


# What an evaluation reports: the losses on any validation set, depth metrics on one of metric depth.
LOSS_METRICS = ("val_loss", "val_spatial", "val_stable")
DEPTH_METRICS = ("val_abs_rel", "val_delta1")

# (key, test, the rule in words), checked in this order; None passes (an unset optional value).
_RANGES = (
    ("total_steps", lambda v: v >= 1, ">= 1"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("image_batch_size", lambda v: v >= 1, ">= 1"),
    ("frames_per_chunk", lambda v: v >= 0, ">= 0 (0: all frames at once)"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("optimizer.lr", lambda v: v > 0, "> 0"),
    ("optimizer.temporal_lr", lambda v: v >= 0, ">= 0 (None: optimizer.lr)"),
    ("optimizer.encoder_lr", lambda v: v >= 0, ">= 0"),
    ("optimizer.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optimizer.end_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optimizer.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.eps", lambda v: v > 0, "> 0"),
    ("optimizer.clip_norm", lambda v: v >= 0, ">= 0 (0: off)"),
    ("loss.alpha", lambda v: v >= 0, ">= 0"),
    ("loss.scales", lambda v: v >= 1, ">= 1"),
    ("loss.trim", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("loss.stable_scale", lambda v: v >= 0, ">= 0"),
    ("loss.clip_groups", lambda v: v >= 1, ">= 1"),
    ("eval.every", lambda v: v >= 0, ">= 0 (0: never)"),
    ("eval.max_batches", lambda v: v >= 0, ">= 0 (0: the whole split)"),
    ("checkpoint.every", lambda v: v >= 1, ">= 1"),
    ("checkpoint.keep", lambda v: v >= 1, ">= 1"),
)


def _check_synthetic(c: config_dict.ConfigDict) -> None:
    """The synthetic data must be the training set and give a batch to every split used, before it is rendered."""
    fields = c.synthetic.to_dict()
    name = fields.pop("name", None)
    if c.data.video_dataset != f"vda_synthetic/{name}":
        raise ValueError(f"synthetic.name {name!r} and data.video_dataset {c.data.video_dataset!r} disagree; set "
                         f"data.video_dataset='vda_synthetic/{name}'")
    synthetic = SyntheticConfig(name=name, **fields)
    if synthetic.scene_kind not in (None, *SCENE_KINDS):
        raise ValueError(f"synthetic.scene_kind must be one of {[*SCENE_KINDS]} or None (a mix), got "
                         f"{synthetic.scene_kind!r}")
    videos = dict(zip(SPLITS, synthetic.num_videos))
    per_video = len(clip_index([synthetic.num_frames], c.data.clip_frames, c.data.clip_stride, c.data.clip_hop))
    uses = {c.data.video_split: "training", **({c.eval.split: "evaluation"} if c.eval.every else {})}
    for split, use in uses.items():
        clips = videos.get(split, 0) * per_video
        if clips < c.batch_size:
            raise ValueError(f"the synthetic {split!r} split ({use}) would hold {clips} clips of {c.data.clip_frames} "
                             f"frames, fewer than one batch of {c.batch_size}; render more videos "
                             f"(synthetic.num_videos, per train/validation/test split) or lower batch_size"
                             + ("" if use == "training" else ", or evaluate never (eval.every=0)"))


# Settings a run cannot change when it resumes: the parameters and optimizer state in the
# checkpoint, and the data position (which clip comes next) depend on them.
FIXED_ON_RESUME = ("model.", "train_encoder", "seed", "batch_size", "image_batch_size", "synthetic",
                   "data.video_dataset", "data.video_split", "data.image_dataset", "data.image_split",
                   "data.clip_frames", "data.clip_stride", "data.clip_hop", "data.image_ratio")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for name, child in tree.items() for k, v in _flat(child, f"{prefix}{name}.").items()}


def resume_changes(previous_json: str, config: config_dict.ConfigDict) -> list[str]:
    """What ``config`` changes against the config a run started with, as ``key: old -> new`` lines.

    Args:
      previous_json: the ``config.json`` the run wrote (``ConfigDict.to_json``).
      config: the config it resumes with.

    Raises:
      ValueError: a change of a ``FIXED_ON_RESUME`` setting, naming every one.
    """
    old, new = _flat(json.loads(previous_json)), _flat(json.loads(config.to_json()))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "(absent)") != new.get(k, "(absent)"))
    lines = [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in changed]
    fixed = [line for k, line in zip(changed, lines) if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        raise ValueError(f"the run in this workdir cannot resume with {'; '.join(fixed)}: these settings are fixed "
                         "once a run starts; restore them or use a new --workdir")
    return lines


def workdir_changes(workdir: str, config: config_dict.ConfigDict) -> list[str]:
    """``resume_changes`` against the config ``workdir``'s run started with (none for a new workdir).

    Raises:
      ValueError: ``workdir`` is a model directory, or the run cannot resume with ``config``.
    """
    previous = os.path.join(workdir, "config.json")
    if not os.path.isfile(previous):
        return []
    with open(previous) as f:
        text = f.read()
    try:
        ours = json.loads(text).get("format") == MODEL_FORMAT
    except (ValueError, AttributeError):
        raise ValueError(f"--workdir {workdir} holds a config.json that is not a training config; choose another "
                         "--workdir") from None
    if ours:
        raise ValueError(f"--workdir {workdir} is a model directory, not a training workdir; choose a new --workdir "
                         f"(to start from this model: init_from={workdir})")
    return resume_changes(text, config)


def _get(config: config_dict.ConfigDict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def _keys(config: config_dict.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, config_dict.ConfigDict):
            keys.extend(_keys(value, f"{prefix}{name}."))
    return keys


# Keys that were renamed: the old name -> the new one.
_RENAMED = {"dtype": "precision"}


def _unknown_key(config: config_dict.ConfigDict, key: str) -> ValueError:
    if key in _RENAMED:
        return ValueError(f"config key {key!r} is now {_RENAMED[key]!r} (values: \"fp32\", \"tf32\", \"bf16\")")
    close = difflib.get_close_matches(key, _keys(config), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see vda_jax/train/config.py for the keys"
    return ValueError(f"unknown config key {key!r}{hint}")


def _parse(key: str, text: str, current: Any) -> Any:
    """``text`` as a value of the type of ``current`` (None means any type)."""
    expected = type(current)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # an unquoted word: only valid where a string is expected
    if expected is str and text != "None":
        return value if isinstance(value, str) else text  # quoted or not
    if value is None and current is None:
        return None
    if isinstance(value, list):
        value = tuple(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and (type(value) is not expected or not _same_element_types(value, current)):
        raise ValueError(f"config key {key!r} holds {_type_name(current)} values (now {current!r}); "
                         f"cannot set it to {text!r}")
    return value


def _same_element_types(value: Any, current: Any) -> bool:
    """A tuple's items have the types of ``current``'s (an int stands for a float)."""
    if not isinstance(current, tuple) or not current:
        return True
    kinds = {type(v) for v in current}
    return all(type(v) in kinds or (float in kinds and type(v) is int) for v in value)


def _type_name(current: Any) -> str:
    if isinstance(current, tuple) and current:
        return f"tuple of {'/'.join(sorted({type(v).__name__ for v in current}))}"
    return type(current).__name__


def apply_overrides(config: config_dict.ConfigDict, overrides: Sequence[str]) -> None:
    """Sets ``dotted.key=value`` items in place; values are Python literals of the key's type."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value, e.g. optimizer.lr=1e-4")
        *parents, name = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, config_dict.ConfigDict) else None
            if not isinstance(node, config_dict.ConfigDict):
                raise _unknown_key(config, key)
        if name not in node:
            raise _unknown_key(config, key)
        if isinstance(node[name], config_dict.ConfigDict):
            raise ValueError(f"config key {key!r} is a group; set its fields as {key}.FIELD=VALUE "
                             f"(fields: {', '.join(node[name].keys())})")
        value = _parse(key, text, node[name])
        try:
            node[name] = value
        except TypeError:  # an unset field declared with a type (config_dict.placeholder)
            kind = node.get_ref(name).get_type().__name__
            raise ValueError(f"config key {key!r} holds {kind} values; cannot set it to {text!r}") from None


def model_config_from(model: config_dict.ConfigDict) -> ModelConfig:
    """The architecture described by ``config.model``."""
    fields = dict(model)
    name = fields.pop("name", None)
    if name == "custom":
        return ModelConfig(encoder="custom", **fields)
    if name is None or name.partition("-")[0] not in ENCODERS:
        raise ValueError(f"model.name must be one of {list(ENCODERS)} (optionally with '-metric') "
                         f"or 'custom', got {name!r}")
    return model_config(name, **fields)
