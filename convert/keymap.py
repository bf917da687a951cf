"""The key map from official PyTorch state dicts to our parameter tree.

The map is data: each rule matches an official key with a regex and names the
target path in our ``nnx.state`` (dotted) and the transform of the value. The
planner checks, from shapes alone, that every source tensor is used, every
parameter is filled and every shape agrees, so a wrong checkpoint fails before
any array is copied.

The way back (``official_key``, ``inverse_value``) exports our models in the
official layout; every official key it produces is checked against the forward map.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np

# Value transforms, PyTorch layout -> ours.
SAME = "same"
LINEAR = "linear"        # weight [out, in] -> kernel [in, out]
CONV = "conv"            # weight [O, I, kh, kw] -> kernel [kh, kw, I, O]
CONV_T = "conv_t"        # ConvTranspose weight [I, O, kh, kw] -> kernel [kh, kw, I, O]
NORM = "norm"            # weight -> scale
TABLE = "table"          # [1, L, D] buffer -> [L, D]
# Fused projections, their parts an axis of their own (layers.FusedLinear):
# weight [P*out, in] -> kernel [in, P, out], bias [P*out] -> [P, out].
FUSED_QKV = "fused_qkv"      # P = 3: q, k, v (each head-major, so `out` splits by heads)
FUSED_GEGLU = "fused_geglu"  # P = 2: GEGLU's value, then its gate
_PARTS = {FUSED_QKV: 3, FUSED_GEGLU: 2}

_TRANSPOSES = {LINEAR: (1, 0), CONV: (2, 3, 1, 0), CONV_T: (2, 3, 0, 1)}
_WEIGHT_LEAF = {LINEAR: "kernel", CONV: "kernel", CONV_T: "kernel", NORM: "scale", FUSED_QKV: "kernel",
                FUSED_GEGLU: "kernel"}


def _transposed(perm: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda value: np.ascontiguousarray(np.transpose(value, perm))


# The inverse of every transform, ours -> PyTorch layout (a new transform adds its entry here).
_INVERSES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    SAME: np.asarray,
    NORM: np.asarray,
    TABLE: lambda value: value[None],
    # [in, P, out] -> [P*out, in] (bias [P, out] -> [P*out])
    **{t: lambda value: np.ascontiguousarray(np.moveaxis(value, (-2, -1), (0, 1)).reshape(-1, *value.shape[:-2]))
       for t in _PARTS},
    **{t: _transposed(tuple(int(i) for i in np.argsort(perm))) for t, perm in _TRANSPOSES.items()},
}

_HEAD = r"(?:head|depth_head)"
_TEMPORAL = _HEAD + r"\.motion_modules\.(\d)\.temporal_transformer\."
_BLOCK0 = _TEMPORAL + r"transformer_blocks\.0\."


def _dec(match: re.Match, group: int) -> str:
    """Official 1-based names (``layer1_rn``, ``refinenet4``) -> our 0-based list index."""
    return str(int(match.group(group)) - 1)


# (source regex, target template or function of the match, transform). The leaf
# (`weight`/`bias`/...) is appended by `_leaf` unless the regex captures the whole key.
_RULES: list[tuple[str, str | Callable[[re.Match], str], str]] = [
    (r"pretrained\.patch_embed\.proj", "encoder.patch_embed", CONV),
    (r"pretrained\.(cls_token|pos_embed|mask_token)$", r"encoder.\1", SAME),
    (r"pretrained\.blocks\.(\d+)\.(norm[12])", r"encoder.blocks.\1.\2", NORM),
    (r"pretrained\.blocks\.(\d+)\.attn\.qkv", r"encoder.blocks.\1.attn.qkv", FUSED_QKV),
    (r"pretrained\.blocks\.(\d+)\.(attn\.proj|mlp\.fc[12]|mlp\.w12|mlp\.w3)", r"encoder.blocks.\1.\2", LINEAR),
    (r"pretrained\.blocks\.(\d+)\.(ls[12])\.gamma$", r"encoder.blocks.\1.\2.gamma", SAME),
    (r"pretrained\.norm", "encoder.norm", NORM),
    (_HEAD + r"\.projects\.(\d)", r"head.projects.\1", CONV),
    (_HEAD + r"\.resize_layers\.([01])", r"head.resize_layers.\1", CONV_T),
    (_HEAD + r"\.resize_layers\.(3)", r"head.resize_layers.\1", CONV),
    (_HEAD + r"\.scratch\.layer([1-4])_rn", lambda m: f"head.layer_rn.{_dec(m, 1)}", CONV),
    (_HEAD + r"\.scratch\.refinenet([1-4])\.out_conv", lambda m: f"head.refinenets.{_dec(m, 1)}.out_conv", CONV),
    (_HEAD + r"\.scratch\.refinenet([1-4])\.resConfUnit([12])\.(conv[12])",
     lambda m: f"head.refinenets.{_dec(m, 1)}.res_unit{m.group(2)}.{m.group(3)}", CONV),
    (_HEAD + r"\.scratch\.output_conv1", "head.output_conv1", CONV),
    (_HEAD + r"\.scratch\.output_conv2\.0", "head.output_conv2", CONV),
    (_HEAD + r"\.scratch\.output_conv2\.2", "head.output_conv3", CONV),
    (_TEMPORAL + r"norm", r"head.temporal.\1.norm", NORM),
    (_TEMPORAL + r"(proj_in|proj_out)", r"head.temporal.\1.\2", LINEAR),
    (_BLOCK0 + r"attention_blocks\.(\d)\.(to_q|to_k|to_v)", r"head.temporal.\1.attention_blocks.\2.\3", LINEAR),
    (_BLOCK0 + r"attention_blocks\.(\d)\.to_out\.0", r"head.temporal.\1.attention_blocks.\2.to_out", LINEAR),
    (_BLOCK0 + r"attention_blocks\.(\d)\.pos_encoder\.pe$", r"head.temporal.\1.attention_blocks.\2.pe", TABLE),
    (_BLOCK0 + r"norms\.(\d)", r"head.temporal.\1.norms.\2", NORM),
    (_BLOCK0 + r"ff_norm", r"head.temporal.\1.ff_norm", NORM),
    (_BLOCK0 + r"ff\.net\.0\.proj", r"head.temporal.\1.ff.proj", FUSED_GEGLU),
    (_BLOCK0 + r"ff\.net\.2", r"head.temporal.\1.ff.out", LINEAR),
]
_COMPILED = [(re.compile(pattern), target, transform) for pattern, target, transform in _RULES]


def target_of(key: str) -> tuple[str, str] | None:
    """Maps an official key to ``(our dotted path, transform)``, or None if no rule matches."""
    for pattern, target, transform in _COMPILED:
        match = pattern.match(key)
        if match is None:
            continue
        module = target(match) if callable(target) else match.expand(target)
        rest = key[match.end():]
        if not rest:
            return module, transform
        leaf = rest.lstrip(".")
        if rest[0] != "." or "." in leaf or leaf not in ("weight", "bias"):
            continue
        if leaf == "weight" and transform in _WEIGHT_LEAF:
            return f"{module}.{_WEIGHT_LEAF[transform]}", transform
        return f"{module}.{leaf}", transform if transform in _PARTS else SAME
    return None


def transform_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    if transform in _PARTS and len(shape) in (1, 2) and shape[0] % _PARTS[transform] == 0:
        parts = (_PARTS[transform], shape[0] // _PARTS[transform])
        return (*shape[1:], *parts)
    if transform in _TRANSPOSES and len(shape) == len(_TRANSPOSES[transform]):
        return tuple(shape[i] for i in _TRANSPOSES[transform])
    if transform == TABLE and len(shape) == 3 and shape[0] == 1:
        return tuple(shape[1:])
    return tuple(shape)


def transform_value(value: np.ndarray, transform: str) -> np.ndarray:
    if transform in _PARTS:  # [P*out, in] -> [in, P, out] (bias [P*out] -> [P, out])
        parts = value.reshape(_PARTS[transform], -1, *value.shape[1:])
        return np.ascontiguousarray(np.moveaxis(parts, (0, 1), (-2, -1)))
    if transform in _TRANSPOSES:
        return np.ascontiguousarray(np.transpose(value, _TRANSPOSES[transform]))
    if transform == TABLE:
        return value.reshape(value.shape[1:])
    return value


def inverse_value(value: np.ndarray, transform: str) -> np.ndarray:
    """Our array -> the official tensor: ``transform_value``'s inverse."""
    return _INVERSES[transform](value)


# Our module paths -> official ones (regex, replacement); the first match applies. The forward
# map stays the reference: `official_key` checks that it maps the result back.
_OFFICIAL_BLOCK0 = r"head.motion_modules.\1.temporal_transformer.transformer_blocks.0."
_OFFICIAL_NAMES: list[tuple[str, str | Callable[[re.Match], str]]] = [
    (r"encoder\.patch_embed\.", "pretrained.patch_embed.proj."),
    (r"encoder\.", "pretrained."),
    (r"head\.layer_rn\.(\d)\.", lambda m: f"head.scratch.layer{int(m.group(1)) + 1}_rn."),
    (r"head\.refinenets\.(\d)\.res_unit", lambda m: f"head.scratch.refinenet{int(m.group(1)) + 1}.resConfUnit"),
    (r"head\.refinenets\.(\d)\.", lambda m: f"head.scratch.refinenet{int(m.group(1)) + 1}."),
    (r"head\.output_conv1\.", "head.scratch.output_conv1."),
    (r"head\.output_conv2\.", "head.scratch.output_conv2.0."),
    (r"head\.output_conv3\.", "head.scratch.output_conv2.2."),
    (r"head\.temporal\.(\d)\.(norm|proj_in|proj_out)\.", r"head.motion_modules.\1.temporal_transformer.\2."),
    (r"head\.temporal\.(\d)\.attention_blocks\.(\d)\.to_out\.", _OFFICIAL_BLOCK0 + r"attention_blocks.\2.to_out.0."),
    (r"head\.temporal\.(\d)\.attention_blocks\.(\d)\.pe$", _OFFICIAL_BLOCK0 + r"attention_blocks.\2.pos_encoder.pe"),
    (r"head\.temporal\.(\d)\.ff\.proj\.", _OFFICIAL_BLOCK0 + "ff.net.0.proj."),
    (r"head\.temporal\.(\d)\.ff\.out\.", _OFFICIAL_BLOCK0 + "ff.net.2."),
    (r"head\.temporal\.(\d)\.", _OFFICIAL_BLOCK0),
]
_OFFICIAL_COMPILED = [(re.compile(pattern), name) for pattern, name in _OFFICIAL_NAMES]


def official_key(path: str) -> tuple[str, str]:
    """Our dotted path -> ``(official key, transform)``: the inverse of ``target_of``.

    Raises:
      KeyError if the path has no official counterpart.
    """
    key = path
    for pattern, name in _OFFICIAL_COMPILED:
        if pattern.match(path):
            key = pattern.sub(name, path, count=1)
            break
    key = re.sub(r"\.(kernel|scale)$", ".weight", key)
    found = target_of(key)
    if found is None or found[0] != path:
        raise KeyError(f"{path} has no key in the official layout")
    return key, found[1]


def _official_name(path: str, head: str) -> str:
    """The official key of our ``path`` with the checkpoint's head naming, else ``path`` itself."""
    try:
        key = official_key(path)[0]
    except KeyError:
        return path
    return f"{head}.{key[len('head.'):]}" if key.startswith("head.") else key


class KeyMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model; the message lists every difference."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Source key -> (target path, transform), validated against the target shapes."""

    moves: dict[str, tuple[str, str]]
    unfilled: tuple[str, ...]  # targets left to their initial value (allowed prefixes only)


def plan_conversion(source_shapes: Mapping[str, tuple[int, ...]],
                    target_shapes: Mapping[str, tuple[int, ...]],
                    *, allow_unfilled: tuple[str, ...] = ()) -> Plan:
    """Checks a checkpoint against a model from shapes alone.

    Args:
      source_shapes: official key -> tensor shape.
      target_shapes: our dotted path -> shape, every variable of the model.
      allow_unfilled: prefixes of targets that may stay unfilled (e.g. the temporal
        layers when starting from an image model).
    Raises:
      KeyMismatchError listing the unexpected, missing and mis-shaped keys.
    """
    moves, unexpected, misshaped, filled, misplaced = {}, [], [], {}, set()
    for key, shape in source_shapes.items():
        found = target_of(key)
        if found is None or found[0] not in target_shapes:
            unexpected.append(key)
            continue
        path, transform = found
        if path in filled:
            unexpected.append(f"{key} (fills {path} again, already from {filled[path]})")
            continue
        want = tuple(target_shapes[path])
        if transform_shape(tuple(shape), transform) != want:
            misshaped.append(f"{key} {tuple(shape)} -> {path} expects {want}")
            misplaced.add(path)  # listed once, as mis-shaped, not again as missing
            continue
        moves[key], filled[path] = (path, transform), key
    unfilled = [p for p in target_shapes if p not in filled]
    missing = [p for p in unfilled if not p.startswith(allow_unfilled) and p not in misplaced]
    if unexpected or missing or misshaped:
        head = "depth_head" if any(k.startswith("depth_head.") for k in source_shapes) else "head"
        parts = []
        for title, items in (("unexpected", unexpected), ("missing", missing), ("mis-shaped", misshaped)):
            if items:
                named = [_official_name(p, head) for p in items[:12]] if title == "missing" else items[:12]
                shown = ", ".join(named) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise KeyMismatchError("checkpoint does not match the model architecture; " + "; ".join(parts)
                               + ". Check --encoder / --config.")
    return Plan(moves=moves, unfilled=tuple(unfilled))
