"""Reading and writing checkpoints: ours and the community CAER-S model's."""
from __future__ import annotations

import inspect
import math
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..constants import CLIP_FRAMES, CONTEXT_CROP, CONTEXT_SIZE, FACE_SIZE
from .caer_net import CAERNet, CAERSNet


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointMetadataError(CheckpointError):
    """A checkpoint whose metadata (``model_type``, ``model_args``, ``args``, ``classes``) is malformed or
    disagrees with its weights."""


class Checkpoint(dict):
    """A checkpoint read from a file: a plain dict that remembers where it came from (``source``),
    so errors raised later, by :func:`load_checkpoint` on this dict, still name the file."""

    source = "checkpoint dict"


def _source_of(obj) -> str:
    if isinstance(obj, Mapping):
        return getattr(obj, "source", "checkpoint dict")
    return str(obj)


def _unwrap_state_dict(obj: Any, source: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):  # ours, the community's
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: no state_dict found (expected a dict of tensors, or one under "
                              f"'model' or 'state_dict')")
    prefixes = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
    out = {}
    for k, v in obj.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (since 1.6) or, in the legacy format, a pickle (protocol ≥ 2)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_checkpoint(path_or_dict: Union[str, os.PathLike, Mapping]) -> dict:
    """Load a checkpoint file safely (``weights_only=True``) or pass a dict through.

    Raises :class:`CheckpointError` naming the file: missing, not a PyTorch file at all, truncated or
    corrupt, or carrying Python objects beyond tensors and plain containers (refused: unpickling them
    could run code).
    """
    if isinstance(path_or_dict, Mapping):
        out = Checkpoint(path_or_dict)
        out.source = _source_of(path_or_dict)
        return out
    path = Path(path_or_dict)
    if not path.is_file():
        if path.exists():
            raise CheckpointError(f"{path}: not a checkpoint file ({'a folder' if path.is_dir() else 'not a regular file'})")
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
        if not _looks_like_torch_file(path):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False: never repeat that; name only the offending global.
        msg = str(exc)
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m or re.search(r"allowlist|reduce|unsupported class", msg, re.I):
            what = f" ({m.group(1)})" if m else ""
            raise CheckpointError(
                f"{path}: refused to load: it holds a Python object{what} beyond tensors and plain "
                f"containers, and unpickling that could run code; only plain checkpoints are loaded") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?)") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt sizes?)") from None
    except Exception as exc:  # zip / storage errors of every kind on a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{first[:200]}") from None
    if isinstance(obj, Mapping):
        obj = Checkpoint(obj)
        obj.source = str(path)
    return obj


_KINDS = {"caer": "CAERNet (video, 3-D convolutions)", "caers": "CAERSNet (image, 2-D convolutions)"}
_FIRST_CONV = "two_stream_net.face_encoding_module.convs.0.weight"
_CLASSIFIER = "fusion_net.fc2.weight"


def _kind_of_weights(state_dict: Mapping[str, torch.Tensor], source: str) -> str:
    w = state_dict.get(_FIRST_CONV)
    if w is None:
        raise CheckpointError(f"{source}: state_dict has no '{_FIRST_CONV}': not a CAER-Net checkpoint")
    if w.dim() not in (4, 5):
        raise CheckpointError(f"{source}: '{_FIRST_CONV}' is {w.dim()}-D, expected 4-D (image model) or 5-D "
                              f"(video model): not a CAER-Net checkpoint")
    return "caer" if w.dim() == 5 else "caers"


def _num_classes_of(state_dict: Mapping[str, torch.Tensor], source: str) -> int:
    w = state_dict.get(_CLASSIFIER)
    if w is None or w.dim() != 2:
        raise CheckpointError(f"{source}: state_dict has no 2-D '{_CLASSIFIER}': not a CAER-Net checkpoint")
    return int(w.shape[0])


def _a(v) -> str:
    name = type(v).__name__
    return ("an " if name[:1] in "aeiou" else "a ") + name


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Bounds of what a checkpoint may ask the predictor to allocate (the same as train's option checks): a crafted
# frames=10**9 or face_size 10**6 would otherwise build a model or buffers of terabytes.
MAX_CLIP_FRAMES = 512
MAX_SIDE = 2048


def _check_size(v) -> bool:
    """A size as stored in ``args``: an int or a pair of ints, all in [1, MAX_SIDE]."""
    if _is_int(v):
        return 1 <= v <= MAX_SIDE
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and 1 <= x <= MAX_SIDE for x in v)


def check_metadata(ckpt: Mapping, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """Check a checkpoint's metadata against its weights; returns the model kind ("caer" or "caers").

    Raises :class:`CheckpointMetadataError` for: ``model_type`` not "caer"/"caers" or not the kind the
    weights are; ``model_args`` not a dict, with unknown names or values of the wrong type; ``args``
    not a dict, or with sizes the predictor could not use; ``classes`` not a list of distinct names as
    long as the classifier's output.
    """
    kind = _kind_of_weights(state_dict, source)
    num_classes = _num_classes_of(state_dict, source)

    def bad(msg):
        raise CheckpointMetadataError(f"{source}: {msg}")

    mt = ckpt.get("model_type")
    if mt is not None:
        if mt not in _KINDS:
            bad(f"model_type {mt!r} is not one of {', '.join(map(repr, _KINDS))}")
        if mt != kind:
            bad(f"model_type says {mt!r} ({_KINDS[mt]}) but the weights are a {_KINDS[kind]}")
    margs = ckpt.get("model_args")
    if margs is not None:
        if not isinstance(margs, Mapping):
            bad(f"model_args is {_a(margs)}, expected a dict of constructor arguments")
        cls = CAERNet if kind == "caer" else CAERSNet
        allowed = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
        unknown = sorted(str(k) for k in margs if k not in allowed)
        if unknown:
            bad(f"model_args has names {cls.__name__} does not take: {', '.join(unknown)} "
                f"(it takes {', '.join(allowed)})")
        for k, v in margs.items():
            if k in ("use_face", "use_context", "concat") and not isinstance(v, bool):
                bad(f"model_args {k}={v!r}, expected true or false")
            if k in ("frames", "num_classes") and not (_is_int(v) and v >= 1):
                bad(f"model_args {k}={v!r}, expected a positive integer")
        if "num_classes" in margs and margs["num_classes"] != num_classes:
            bad(f"model_args num_classes={margs['num_classes']} but the classifier has {num_classes} outputs")
        if "frames" in margs and margs["frames"] > MAX_CLIP_FRAMES:
            bad(f"model_args frames={margs['frames']}: more than {MAX_CLIP_FRAMES} frames per clip")
        if kind == "caer" and "frames" in margs and margs["frames"] < 8:
            bad(f"model_args frames={margs['frames']}: the video model needs clips of at least 8 frames")
    args = ckpt.get("args")
    if args is not None:
        if not isinstance(args, Mapping):
            bad(f"args is {_a(args)}, expected a dict of the training options")
        for k in ("face_size", "context_size"):
            if args.get(k) is not None and not _check_size(args[k]):
                bad(f"args {k}={args[k]!r}, expected a positive int or [height, width], sides at most {MAX_SIDE}")
        crop = args.get("crop")
        if crop is not None and not (_is_int(crop) and 1 <= crop <= MAX_SIDE):
            bad(f"args crop={crop!r}, expected a positive integer up to {MAX_SIDE} or null")
        cf = args.get("clip_frames")
        if cf is not None and not (_is_int(cf) and 1 <= cf <= MAX_CLIP_FRAMES):
            bad(f"args clip_frames={cf!r}, expected a positive integer up to {MAX_CLIP_FRAMES}")
    classes = ckpt.get("classes")
    if classes is not None:
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) and c for c in classes):
            bad(f"classes is {_a(classes)} holding {', '.join(sorted({type(c).__name__ for c in classes})) if isinstance(classes, (list, tuple)) else 'no names'}, expected a list of class names")
        if len(classes) != num_classes:
            bad(f"classes lists {len(classes)} names but the classifier has {num_classes} outputs")
        if len(set(classes)) != len(classes):
            bad(f"classes has repeated names: {list(classes)}")
    for k in ("epoch",):
        if ckpt.get(k) is not None and not _is_int(ckpt[k]):
            bad(f"{k}={ckpt[k]!r}, expected an integer")
    best = ckpt.get("best_acc")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best)):
        bad(f"best_acc={best!r}, expected a number")
    return kind


def infer_model(state_dict: Mapping[str, torch.Tensor], meta: Optional[Mapping] = None) -> nn.Module:
    """Build the model a state_dict belongs to (video if its convolutions are 3-D)."""
    source = _source_of(meta) if meta is not None else "state_dict"
    kind = check_metadata(meta or {}, state_dict, source)
    args = dict((meta or {}).get("model_args") or {})
    args.setdefault("num_classes", _num_classes_of(state_dict, source))
    return CAERNet(**args) if kind == "caer" else CAERSNet(**args)


def load_checkpoint(path_or_dict: Union[str, os.PathLike, Mapping], model: Optional[nn.Module] = None,
                    strict: bool = True) -> nn.Module:
    """Load weights into ``model`` (or into a new model of the checkpoint's kind) and return it.

    Reads our ``checkpoint.pth`` files (weights under ``"model"``), the community CAER-S checkpoints
    (weights under ``"state_dict"``, keys possibly prefixed by ``module.``), and bare state_dicts.
    Files are read with ``torch.load(weights_only=True)``: a pickle carrying code is refused.

    Example:
        >>> model = load_checkpoint("runs/demo/checkpoint.pth")          # doctest: +SKIP
        >>> model = load_checkpoint("model_best.pth", CAERSNet())        # doctest: +SKIP
    """
    source = _source_of(path_or_dict)
    ckpt = read_checkpoint(path_or_dict)
    state_dict = _unwrap_state_dict(ckpt, source)
    meta = ckpt if isinstance(ckpt, Mapping) else {}
    if model is None:
        model = infer_model(state_dict, meta)
    target = getattr(model, "_orig_mod", model)  # a torch.compile'd model
    target = getattr(target, "module", target)  # DDP
    if model is not None and _FIRST_CONV in state_dict and isinstance(target, _caer_classes()):
        kind = check_metadata(meta, state_dict, source)
        want = "caer" if target.__class__.__name__ == "CAERNet" else "caers"
        if kind != want:  # say so in one line rather than listing every mis-shaped weight
            raise CheckpointError(f"{source} holds a {_KINDS[kind]}, the model is a {_KINDS[want]}: "
                                  f"shape mismatch for {_FIRST_CONV}")
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"{source} does not fit {type(target).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}"
                         f"{' …' if len(unexpected) > 8 else ''}")
        for k in mismatched[:8]:
            lines.append(f"  shape mismatch for {k}: checkpoint {tuple(state_dict[k].shape)}, "
                         f"model {tuple(expected[k].shape)}")
        raise CheckpointError("\n".join(lines))
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a diverged run's weights predict NaN for everything: refuse them by name
        raise CheckpointError(f"{source}: {len(bad)} weight tensors hold NaN or inf (a diverged run?), "
                              f"e.g. {bad[0]}")
    target.load_state_dict(state_dict, strict=strict)
    return model


def _caer_classes():
    return (CAERNet, CAERSNet)


def _pair(v, default):
    if v is None:
        return tuple(default)
    if isinstance(v, int):
        return (v, v)
    v = list(v)
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


def input_sizes(ckpt: Mapping, model: Optional[nn.Module] = None) -> dict:
    """The preprocessing sizes a checkpoint was trained with (its ``args``, else the paper's):
    ``face_size`` (h, w), ``context_size`` (h, w, before the crop), ``crop`` (the square side or None),
    ``crop_box`` (top, left, h, w of the centred crop, or None), ``clip_frames``, and ``face_shape`` /
    ``context_shape``: the model's inputs without the batch dimension (3×h×w, or 3×T×h×w for the
    video model ``model``)."""
    args = dict((ckpt or {}).get("args") or {})
    face = _pair(args.get("face_size"), FACE_SIZE)
    context = _pair(args.get("context_size"), CONTEXT_SIZE)
    crop = args.get("crop", CONTEXT_CROP)
    box = None
    if crop:
        crop = min(int(crop), *context)
        box = ((context[0] - crop) // 2, (context[1] - crop) // 2, crop, crop)
    frames = int(getattr(model, "frames", None) or args.get("clip_frames") or CLIP_FRAMES)
    seen = box[2:] if box else context
    if isinstance(model, CAERNet):
        face_shape, context_shape = (3, frames, *face), (3, frames, *seen)
    else:
        face_shape, context_shape = (3, *face), (3, *seen)
    return {"face_size": face, "context_size": context, "crop": crop or None, "crop_box": box, "clip_frames": frames,
            "face_shape": face_shape, "context_shape": context_shape}


def save_checkpoint(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """Write ``obj`` with ``torch.save`` atomically: temp file in the same folder, fsync, rename.

    A crash or a full disk mid-write leaves the previous file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
            raise CheckpointError(f"{path}: could not write the checkpoint (disk full?): {exc}; "
                                  f"the previous file there, if any, is untouched") from exc
        raise
    return path
