"""Calibration data for int8 quantisation, read from a dataset tree (the CLIs' ``--calibrate ROOT``).

:func:`calibration_batches` gives (face, context) batches preprocessed as at test time, for
:func:`caer_fast.quantize_int8` (and any other calibrating engine).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Tuple

import torch


def _caers_split_root(root: Path) -> Path:
    """ROOT itself when it is a CAER-S tree (``train/`` + ``train.txt``), or ROOT/CAER-S (the demo's layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--calibrate {root}: no such directory")
    if (root / "train").is_dir():
        return root
    if (root / "CAER-S" / "train").is_dir():
        return root / "CAER-S"
    raise FileNotFoundError(f"--calibrate {root}: not a CAER-S tree (expected {root}/train/<Emotion>/*.png and "
                            f"{root}/train.txt, or {root}/CAER-S/…; python -m caer_fast.data.synthetic writes one)")


def calibration_batches(root, samples: int = 64, *, face_size=(96, 96), context_size=(128, 171), crop=112,
                        split: str = "train", batch_size: int = 16) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Calibration batches from a CAER-S tree: ``samples`` images of ``split`` spread evenly over the
    (class-sorted) list, preprocessed as at test time (face boxes from ``<split>.txt``, centre crop).

    ``root`` is a CAER-S folder or a folder holding ``CAER-S/`` (the demo data's root).
    """
    import numpy as np

    from .datasets import CAERSImageDataset, Skipped

    if samples < 1:
        raise ValueError(f"calibration samples must be >= 1, got {samples}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no face-box file": calibration still works without boxes
        ds = CAERSImageDataset(_caers_split_root(root), split, train=False, face_size=face_size,
                               context_size=context_size, crop=crop)
    n = min(int(samples), len(ds))
    picks = np.unique(np.linspace(0, len(ds) - 1, n).round().astype(int))
    faces, contexts = [], []
    for i in picks:
        s = ds[int(i)]
        if s is None or isinstance(s, Skipped):
            continue
        faces.append(s["face"])
        contexts.append(s["context"])
    if not faces:
        raise ValueError(f"calibration: no readable images in {ds.root / split}")
    face, context = torch.stack(faces), torch.stack(contexts)
    return [(face[i:i + batch_size], context[i:i + batch_size]) for i in range(0, len(face), batch_size)]
