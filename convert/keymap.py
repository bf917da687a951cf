"""The key map from official PyTorch state dicts to our parameter tree.

The map is data: each rule matches an official key with a regex and names the
target path in our ``nnx.state`` (dotted) and the transform of the value. The
planner checks, from shapes alone, that every source tensor is used, every
parameter is filled and every shape agrees, so a wrong checkpoint fails before
any array is copied.
"""

from __future__ import annotations

import dataclasses
import itertools
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


def _official_name(path: str, head: str = "head") -> str:
    """The official key that fills our ``path`` (``head`` or ``depth_head`` naming), else ``path`` itself.

    Inverts the rules by search: each capture group of a rule is tried with the runs of
    ``path``'s dotted parts and its numbers (also one higher, for 1-based names) that it matches,
    and a candidate counts only if ``target_of`` maps it back to ``path``.
    """
    parts = path.split(".")
    spans = {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)}
    numbers = re.findall(r"\d+", path)
    spans |= {*numbers, *(str(int(n) + 1) for n in numbers)}
    for pattern, _, _ in _RULES:
        pieces = re.split(r"(\((?!\?)[^()]*\))", pattern.replace(_HEAD, head).rstrip("$"))
        literal = [p.replace("\\.", ".") for p in pieces[::2]]
        options = [[v for v in spans if re.fullmatch(group[1:-1], v)] for group in pieces[1::2]]
        for values in itertools.product(*options):
            stem = "".join(x for pair in itertools.zip_longest(literal, values, fillvalue="") for x in pair)
            for key in (stem, f"{stem}.weight", f"{stem}.bias"):
                found = target_of(key)
                if found is not None and found[0] == path:
                    return key
    return path


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
