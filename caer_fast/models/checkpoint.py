"""Reading and writing checkpoints: ours and the community CAER-S model's."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


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


def read_checkpoint(path_or_dict: Union[str, os.PathLike, Mapping]) -> dict:
    """Load a checkpoint file safely (``weights_only=True``) or pass a dict through."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects beyond tensors and plain containers, which "
            f"could run code when unpickled. Only weights_only checkpoints are loaded. ({exc})".strip()) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from None


def infer_model(state_dict: Mapping[str, torch.Tensor], meta: Optional[Mapping] = None) -> nn.Module:
    """Build the model a state_dict belongs to (video if its convolutions are 3-D)."""
    from .caer_net import CAERNet, CAERSNet

    args = dict((meta or {}).get("model_args") or {})
    w = state_dict.get("two_stream_net.face_encoding_module.convs.0.weight")
    if w is None:
        raise CheckpointError("state_dict has no 'two_stream_net.face_encoding_module.convs.0.weight': "
                              "not a CAER-Net checkpoint")
    num_classes = state_dict["fusion_net.fc2.weight"].shape[0]
    args.setdefault("num_classes", num_classes)
    return CAERNet(**args) if w.dim() == 5 else CAERSNet(**args)


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
    source = str(path_or_dict) if not isinstance(path_or_dict, Mapping) else "checkpoint dict"
    ckpt = read_checkpoint(path_or_dict)
    state_dict = _unwrap_state_dict(ckpt, source)
    if model is None:
        model = infer_model(state_dict, ckpt if isinstance(ckpt, Mapping) else None)
    target = getattr(model, "_orig_mod", model)  # a torch.compile'd model
    target = getattr(target, "module", target)  # DDP
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
    target.load_state_dict(state_dict, strict=strict)
    return model


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
