"""Accuracy, per-class accuracy and the confusion matrix (JSON and PNG)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import torch

from ..constants import CLASSES


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """num_classes × num_classes counts; rows are true classes, columns predictions."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def summarize(cm: torch.Tensor, classes: Sequence[str] = CLASSES) -> Dict:
    total = int(cm.sum())
    correct = int(cm.diag().sum())
    support = cm.sum(dim=1)
    per_class = {c: (float(cm[i, i] / support[i] * 100) if support[i] > 0 else None) for i, c in enumerate(classes)}
    return {
        "top1": 100.0 * correct / total if total else 0.0,
        "count": total,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def save_confusion_png(cm: torch.Tensor, path, title: str, classes: Sequence[str] = CLASSES) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmf = cm.float()
    rows = cmf / cmf.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=110)
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(obj, path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))
    tmp.replace(path)
    return path
