"""MTCNN face detector (Zhang et al. 2016): the P-, R- and O-nets and their cascade, on one RGB frame.

The nets and their weights (``mtcnn_weights/{pnet,rnet,onet}.pt``) are copied from facenet-pytorch 2.6.0
(MIT licence, © 2019 Timothy Esler, see ``mtcnn_weights/LICENSE.md``), which converted them from the
authors' Caffe models. The package itself cannot be used here: it pins torch<2.3 and imports torchvision
(whose PyPI build needs CUDA torch) only for its NMS. The cascade below follows its ``detect_face`` with a
numpy NMS, for one image at a time.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mtcnn_weights")


class _CaffeNet(nn.Module):
    """Stages ``conv{i} → prelu{i} [→ pool{i}]``, then optionally ``dense{k} → prelu{k}`` on the flattened map:
    the module names are those of the weight files, so their state_dicts load strictly."""

    # convs: (in channels, out channels, kernel, pool kernel or None, pool stride) per stage
    def __init__(self, convs: Sequence[Tuple[int, int, int, Optional[int], int]],
                 dense: Optional[Tuple[int, int]] = None):
        super().__init__()
        self._stages = len(convs)
        for i, (cin, cout, k, pool, stride) in enumerate(convs, 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel_size=k))
            setattr(self, f"prelu{i}", nn.PReLU(cout))
            if pool is not None:
                setattr(self, f"pool{i}", nn.MaxPool2d(pool, stride, ceil_mode=True))
        self._dense = dense is not None
        if dense is not None:
            k = len(convs) + 1
            setattr(self, f"dense{k}", nn.Linear(*dense))
            setattr(self, f"prelu{k}", nn.PReLU(dense[1]))

    def features(self, x):
        for i in range(1, self._stages + 1):
            x = getattr(self, f"prelu{i}")(getattr(self, f"conv{i}")(x))
            pool = getattr(self, f"pool{i}", None)
            if pool is not None:
                x = pool(x)
        if self._dense:
            k = self._stages + 1
            # the Caffe weights expect the flattening order of a (N, W, H, C) tensor
            x = getattr(self, f"prelu{k}")(getattr(self, f"dense{k}")(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return x


class PNet(_CaffeNet):
    def __init__(self):
        super().__init__([(3, 10, 3, 2, 2), (10, 16, 3, None, 0), (16, 32, 3, None, 0)])
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.features(x)
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(_CaffeNet):
    def __init__(self):
        super().__init__([(3, 28, 3, 3, 2), (28, 48, 3, 3, 2), (48, 64, 2, None, 0)], dense=(576, 128))
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.features(x)
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(_CaffeNet):
    def __init__(self):
        super().__init__([(3, 32, 3, 3, 2), (32, 64, 3, 3, 2), (64, 64, 3, 2, 2), (64, 128, 2, None, 0)],
                         dense=(1152, 256))
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.features(x)
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def load_nets() -> Tuple[PNet, RNet, ONet]:
    nets = []
    for cls, name in ((PNet, "pnet"), (RNet, "rnet"), (ONet, "onet")):
        net = cls()
        path = os.path.join(WEIGHTS_DIR, f"{name}.pt")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        nets.append(net.eval())
    return tuple(nets)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Greedy NMS; ``method="min"`` divides the overlap by the smaller box (MTCNN's last stage)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, np.int64)


def _square(b: np.ndarray) -> np.ndarray:
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b = b.copy()
    b[:, 0] += w * 0.5 - side * 0.5
    b[:, 1] += h * 0.5 - side * 0.5
    b[:, 2] = b[:, 0] + side
    b[:, 3] = b[:, 1] + side
    return b


def _regress(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    w = (b[:, 2] - b[:, 0] + 1)[:, None]
    h = (b[:, 3] - b[:, 1] + 1)[:, None]
    b = b.copy()
    b[:, 0:4] += reg[:, 0:4] * np.concatenate([w, h, w, h], axis=1)
    return b


def _normalise(rgb_u8: np.ndarray) -> torch.Tensor:
    """N×h×w×3 (or h×w×3) uint8 → N×3×h×w float in [-1, 1) as the nets were trained."""
    t = torch.from_numpy(np.ascontiguousarray(rgb_u8)).float()
    t = t[None] if t.ndim == 3 else t
    return (t.permute(0, 3, 1, 2) - 127.5) * 0.0078125


def _crops(rgb: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Each box cut out of the frame, clipped to it, area-resized to size×size (OpenCV: ~10× faster
    than torch's area interpolation here)."""
    import cv2

    h, w = rgb.shape[:2]
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(np.trunc(boxes[:, :4]).astype(np.int64)):
        x1, y1 = max(int(x1), 1), max(int(y1), 1)
        x2, y2 = min(int(x2), w), min(int(y2), h)
        patch = rgb[y1 - 1:max(y2, y1), x1 - 1:max(x2, x1)]
        out[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return _normalise(out)


@torch.inference_mode()
def detect(rgb: np.ndarray, nets: Sequence[nn.Module], min_size: int = 20,
           thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = 0.709) -> List[Tuple[float, ...]]:
    """Faces in one uint8 H×W×3 RGB frame: ``[(x1, y1, x2, y2, prob), ...]`` in float pixels."""
    import cv2

    pnet, rnet, onet = nets
    h, w = rgb.shape[:2]
    m = 12.0 / min_size
    scales, minl = [], min(h, w) * m
    while minl >= 12:
        scales.append(m * factor ** len(scales))
        minl *= factor

    # stage 1: the fully convolutional P-net over an image pyramid
    cands = []
    for s in scales:
        im = cv2.resize(rgb, (int(w * s + 1), int(h * s + 1)), interpolation=cv2.INTER_AREA)
        reg, prob = pnet(_normalise(im))
        p = prob[0, 1].numpy()
        ys, xs = np.nonzero(p >= thresholds[0])
        if len(ys) == 0:
            continue
        q1 = np.floor((2 * np.stack([xs, ys], 1) + 1) / s)
        q2 = np.floor((2 * np.stack([xs, ys], 1) + 12) / s)
        b = np.concatenate([q1, q2, p[ys, xs][:, None], reg[0][:, ys, xs].numpy().T], axis=1)
        cands.append(b[nms(b[:, :4], b[:, 4], 0.5)])
    if not cands:
        return []
    b = np.concatenate(cands)
    b = b[nms(b[:, :4], b[:, 4], 0.7)]
    wh = (b[:, 2:4] - b[:, 0:2])
    b = np.concatenate([b[:, 0:2] + b[:, 5:7] * wh, b[:, 2:4] + b[:, 7:9] * wh, b[:, 4:5]], axis=1)
    b = _square(b)

    # stage 2: R-net refines and rejects on 24×24 crops
    reg, prob = rnet(_crops(rgb, b, 24))
    keep = prob[:, 1].numpy() > thresholds[1]
    b, reg = b[keep], reg.numpy()[keep]
    b[:, 4] = prob[:, 1].numpy()[keep]
    if len(b) == 0:
        return []
    k = nms(b[:, :4], b[:, 4], 0.7)
    b = _square(_regress(b[k], reg[k]))

    # stage 3: O-net on 48×48 crops, then NMS by overlap over the smaller box
    reg, _, prob = onet(_crops(rgb, b, 48))
    keep = prob[:, 1].numpy() > thresholds[2]
    b, reg = b[keep], reg.numpy()[keep]
    b[:, 4] = prob[:, 1].numpy()[keep]
    if len(b) == 0:
        return []
    b = _regress(b, reg)
    b = b[nms(b[:, :4], b[:, 4], 0.7, "min")]
    return [tuple(float(v) for v in row[:5]) for row in b]
