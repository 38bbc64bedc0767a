"""Calibration data for int8 quantisation: read from a dataset tree (the CLIs' ``--calibrate ROOT``), images
or video clips, or the small sample ``train`` saves beside its checkpoint (``calibration.pt``).

:func:`calibration_batches` gives (face, context) batches preprocessed as at test time, for
:func:`caer_fast.quantize_int8` (and any other calibrating engine).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from .datasets import CAERSImageDataset, CAERVideoDataset, Skipped


def _spread_batches(ds, samples: int, batch_size: int, offset: int, empty: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(face, context) batches of ``samples`` items spread evenly over ``ds`` (shifted by ``offset``), the
    unreadable ones skipped; ValueError ``calibration: <empty>`` when none is readable."""
    n = min(int(samples), len(ds))
    picks = (np.unique(np.linspace(0, len(ds) - 1, n).round().astype(int)) + int(offset)) % max(len(ds), 1)
    faces, contexts = [], []
    for i in picks:
        s = ds[int(i)]
        if s is None or isinstance(s, Skipped):
            continue
        faces.append(s["face"])
        contexts.append(s["context"])
    if not faces:
        raise ValueError(f"calibration: {empty}")
    face, context = torch.stack(faces), torch.stack(contexts)
    return [(face[i:i + batch_size], context[i:i + batch_size]) for i in range(0, len(face), batch_size)]


def _split_root(root: Path, layout: str, expected: str) -> Path:
    """ROOT itself when it is a ``layout`` tree (``train/``), or ROOT/``layout`` (the demo's layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--calibrate {root}: no such directory")
    if (root / "train").is_dir():
        return root
    if (root / layout / "train").is_dir():
        return root / layout
    raise FileNotFoundError(f"--calibrate {root}: not a {layout} tree (expected {root}/{expected}, or "
                            f"{root}/{layout}/…; python -m caer_fast.data.synthetic writes one)")


def _caers_split_root(root: Path) -> Path:
    return _split_root(root, "CAER-S", "train/<Emotion>/*.png and train.txt")


def calibration_batches(root, samples: int = 64, *, face_size=(96, 96), context_size=(128, 171), crop=112,
                        split: str = "train", batch_size: int = 16) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Calibration batches from a CAER-S tree: ``samples`` images of ``split`` spread evenly over the
    (class-sorted) list, preprocessed as at test time (face boxes from ``<split>.txt``, centre crop).

    ``root`` is a CAER-S folder or a folder holding ``CAER-S/`` (the demo data's root).
    """
    if samples < 1:
        raise ValueError(f"calibration samples must be >= 1, got {samples}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no face-box file": calibration still works without boxes
        ds = CAERSImageDataset(_caers_split_root(root), split, train=False, face_size=face_size,
                               context_size=context_size, crop=crop)
    return _spread_batches(ds, samples, batch_size, 0, f"no readable images in {ds.root / split}")


def _caer_split_root(root: Path) -> Path:
    return _split_root(root, "CAER", "train/<Emotion>/*.avi and train.faces.csv")


def video_calibration_batches(root, samples: int = 32, *, clip_frames: int = 16, face_size=(96, 96),
                              context_size=(128, 171), crop=112, split: str = "train", batch_size: int = 8,
                              offset: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Calibration batches of video clips from a CAER tree: ``samples`` clips of ``split`` spread evenly
    over the (class-sorted) clip list, preprocessed as at test time. ``offset`` shifts the picks by that
    many clips (e.g. ``offset=1`` for held-out clips beside a calibration set)."""
    if samples < 1:
        raise ValueError(f"calibration samples must be >= 1, got {samples}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CAERVideoDataset(_caer_split_root(root), split, train=False, clip_frames=clip_frames,
                              face_size=face_size, context_size=context_size, crop=crop)
    return _spread_batches(ds, samples, batch_size, offset, f"no readable clips in {ds.root / split}")


CALIBRATION_FILE = "calibration.pt"


def save_calibration_sample(path, batches) -> Path:
    """Write (face, context) batches to ``path`` (``calibration.pt`` beside a checkpoint), atomically:
    a later ``predict --engine int8`` calibrates from it without the training data."""
    import os

    face = torch.cat([b[0] for b in batches]).contiguous()
    context = torch.cat([b[1] for b in batches]).contiguous()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"face": face, "context": context, "version": 1}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_calibration_sample(path, batch_size: int = 8) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The batches :func:`save_calibration_sample` wrote; a clear error for anything else."""
    path = Path(path)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no calibration sample (train writes one beside checkpoint.pth; or "
                                f"give --calibrate ROOT)") from None
    except Exception as exc:
        raise ValueError(f"{path}: not a calibration sample ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("face"), torch.Tensor)
            and isinstance(doc.get("context"), torch.Tensor) and len(doc["face"]) == len(doc["context"]) > 0):
        raise ValueError(f"{path}: not a calibration sample (expected face and context tensors of equal length)")
    face, context = doc["face"].float(), doc["context"].float()
    return [(face[i:i + batch_size], context[i:i + batch_size]) for i in range(0, len(face), batch_size)]
