"""Face detectors behind one interface: ``detect(rgb) -> [(x1, y1, x2, y2, score), ...]``.

``rgb`` is a uint8 H×W×3 RGB frame (what :mod:`caer_fast.data.video` decodes); boxes are integer
pixels, xyxy, clipped to the frame, ``x2 > x1`` and ``y2 > y1``. Scores are the detector's own
confidence (comparable within one detector only).

- ``auto`` (the commands' default): ``haar`` for one face per frame (``--people main``: the answers of
  earlier releases stay the same), ``mtcnn`` when every person counts (``--people all|N``: its recall is the
  better one), ``haar`` where MTCNN cannot load (:func:`resolve_detector`).
- ``haar``: OpenCV's frontal-face Haar cascade (``haarcascade_frontalface_default.xml`` from
  ``cv2.data.haarcascades``, shipped inside opencv-python-headless < 5). Fast, needs no extra package;
  score = the cascade's last-stage level weight from ``detectMultiScale3``.
- ``dlib-cnn``: dlib's CNN "mmod" detector, the one the community CAER-S boxes came from. About 2 s per
  640×480 frame on a CPU core. Needs the optional extra ``pip install dlib-bin face-recognition-models``
  (the model file is loaded by path: ``face_recognition_models`` itself fails to import without
  ``pkg_resources``).
- ``dlib-hog``: dlib's HOG + linear SVM frontal detector, same extra, model built into dlib.
- ``mtcnn``: the MTCNN cascade (P-, R-, O-net) in PyTorch, its weights shipped in the package
  (:mod:`caer_fast.data.mtcnn`, copied from facenet-pytorch under its MIT licence). Finds small, turned
  and dim faces that Haar misses (bench/RESULTS.md "Every face"); score = the O-net's face probability.
  Runs one torch thread by default, whatever the process's thread count (``threads``).

:func:`best_face` keeps one face per frame: the largest among the confident ones.
:func:`faces_by_size` keeps several (every person in the scene): largest first, above a score floor.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..devices import thread_openmp_threads
from . import mtcnn

Detection = Tuple[int, int, int, int, float]
DETECTORS = ("haar", "dlib-cnn", "dlib-hog", "mtcnn")
AUTO = "auto"
log = logging.getLogger(__name__)
DLIB_INSTALL = "pip install dlib-bin face-recognition-models"


class DetectorUnavailable(RuntimeError):
    """The detector's package or model file is missing; the message says what to install."""


def _check_frame(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 H×W×3 RGB frame, got {rgb.dtype} {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _clip(x1, y1, x2, y2, w, h) -> Optional[Tuple[int, int, int, int]]:
    x1, y1 = max(0, int(round(x1))), max(0, int(round(y1)))
    x2, y2 = min(w, int(round(x2))), min(h, int(round(y2)))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


class FaceDetector:
    """Base class: subclasses set ``name`` and implement :meth:`_detect` on a (maybe downscaled) frame.

    Args:
        min_size: smallest face side kept, in pixels of the original frame.
        detect_height: frames taller than this are downscaled to this height before detection and the
            boxes scaled back (0 or None: full resolution). The Haar cascade costs grow with the pixel
            count, so this is its main speed knob; dlib's detectors miss faces under ~80 px and default
            to full resolution.
    """

    name = "base"
    default_detect_height: Optional[int] = None

    def __init__(self, min_size: int = 32, detect_height: Optional[int] = -1):
        self.min_size = int(min_size)
        self.detect_height = self.default_detect_height if detect_height == -1 else (detect_height or None)

    def _detect(self, rgb: np.ndarray, min_size: int) -> List[Detection]:
        raise NotImplementedError

    def detect(self, rgb) -> List[Detection]:
        rgb = _check_frame(rgb)
        h, w = rgb.shape[:2]
        scale = 1.0
        if self.detect_height and h > self.detect_height:
            import cv2

            scale = self.detect_height / h
            rgb = cv2.resize(rgb, (max(1, round(w * scale)), self.detect_height), interpolation=cv2.INTER_AREA)
        out = []
        for x1, y1, x2, y2, s in self._detect(rgb, max(1, int(self.min_size * scale))):
            box = _clip(x1 / scale, y1 / scale, x2 / scale, y2 / scale, w, h)
            if box is not None and min(box[2] - box[0], box[3] - box[1]) >= self.min_size:
                out.append((*box, float(s)))
        return out

    def __call__(self, rgb) -> List[Detection]:
        return self.detect(rgb)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(min_size={self.min_size}, detect_height={self.detect_height})"


class HaarDetector(FaceDetector):
    """OpenCV frontal-face Haar cascade (detects on frames downscaled to 240 px high by default).

    ``scale_factor`` and ``min_neighbors`` are ``detectMultiScale``'s; 5 neighbours keeps false
    positives on textured backgrounds rare. No histogram equalisation: on textures (brick, foliage) it
    produced face-like false positives in our tests.
    """

    name = "haar"
    CASCADE = "haarcascade_frontalface_default.xml"
    WINDOW = 24  # the cascade's training window: nothing smaller can be found
    default_detect_height = 240

    def __init__(self, min_size: int = 32, detect_height: Optional[int] = -1, scale_factor: float = 1.1,
                 min_neighbors: int = 5):
        super().__init__(min_size, detect_height)
        import cv2

        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise DetectorUnavailable("this OpenCV has no Haar cascades (opencv 5.x dropped them): "
                                      "pip install 'opencv-python-headless<5'")
        path = os.path.join(cv2.data.haarcascades, self.CASCADE)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise DetectorUnavailable(f"cannot load the Haar cascade {path}")
        self._cv2 = cv2
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors

    def _detect(self, rgb, min_size):
        cv2 = self._cv2
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        m = max(self.WINDOW, min_size)
        # detectMultiScale3 with outputRejectLevels gives a confidence (last-stage weight) per box.
        rects, _, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(m, m),
            outputRejectLevels=True)
        return [(x, y, x + bw, y + bh, float(s))
                for (x, y, bw, bh), s in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1))]


def _dlib():
    try:
        import dlib
    except ImportError:
        raise DetectorUnavailable(f"the dlib detectors need dlib: {DLIB_INSTALL}") from None
    return dlib


def dlib_cnn_model_path() -> str:
    """Path of ``mmod_human_face_detector.dat`` inside the installed face-recognition-models."""
    # find_spec, not import: the package's __init__ needs pkg_resources, which may be absent.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorUnavailable(f"dlib-cnn needs the model file from face-recognition-models: {DLIB_INSTALL}")
    for base in spec.submodule_search_locations:
        path = os.path.join(base, "models", "mmod_human_face_detector.dat")
        if os.path.isfile(path):
            return path
    raise DetectorUnavailable(f"face-recognition-models is installed but has no mmod_human_face_detector.dat: "
                              f"reinstall it ({DLIB_INSTALL})")


class DlibCNNDetector(FaceDetector):
    """dlib's CNN mmod face detector (slow on CPU, robust to pose)."""

    name = "dlib-cnn"

    def __init__(self, min_size: int = 32, detect_height: Optional[int] = -1, upsample: int = 0):
        super().__init__(min_size, detect_height)
        dlib = _dlib()
        self._net = dlib.cnn_face_detection_model_v1(dlib_cnn_model_path())
        self.upsample = int(upsample)

    def _detect(self, rgb, min_size):
        # dlib rectangles are inclusive: right/bottom + 1 gives xyxy with exclusive ends.
        return [(d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1, d.confidence)
                for d in self._net(rgb, self.upsample)]


class DlibHOGDetector(FaceDetector):
    """dlib's HOG frontal face detector (fast, frontal faces only)."""

    name = "dlib-hog"

    def __init__(self, min_size: int = 32, detect_height: Optional[int] = -1, upsample: int = 0):
        super().__init__(min_size, detect_height)
        dlib = _dlib()
        self._det = dlib.get_frontal_face_detector()
        self.upsample = int(upsample)

    def _detect(self, rgb, min_size):
        rects, scores, _ = self._det.run(rgb, self.upsample, 0.0)
        return [(r.left(), r.top(), r.right() + 1, r.bottom() + 1, s) for r, s in zip(rects, scores)]


class MTCNNDetector(FaceDetector):
    """MTCNN (Zhang et al. 2016): a three-stage CNN cascade, robust to pose, scale and partial occlusion.

    ``thresholds`` are the three stages' face-probability cut-offs; ``factor`` the pyramid step. The
    P-net pyramid starts at ``12 / min_size``, so ``min_size`` is also the main speed knob. Runs on the
    CPU with ``threads`` OpenMP threads in the calling thread (None: torch's count): its many small
    convolutions are faster on one thread than on two that wait on each other, above all beside a model
    that holds the cores (bench/RESULTS.md "Every face").
    """

    name = "mtcnn"

    def __init__(self, min_size: int = 32, detect_height: Optional[int] = -1,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = 0.709, threads: Optional[int] = 1):
        super().__init__(min_size, detect_height)
        self.threads = threads

        self._mtcnn = mtcnn
        try:
            self._nets = mtcnn.load_nets()
        except FileNotFoundError as e:
            raise DetectorUnavailable(f"the MTCNN weights are missing from the installed caer_fast: {e}") from None
        self.thresholds, self.factor = tuple(thresholds), float(factor)

    def _detect(self, rgb, min_size):
        with contextlib.nullcontext() if self.threads is None else thread_openmp_threads(self.threads):
            return self._mtcnn.detect(rgb, self._nets, max(12, min_size), self.thresholds, self.factor)


def resolve_detector(name: str, people: bool = False) -> str:
    """The detector ``name`` stands for: ``auto`` is ``mtcnn`` when ``people`` (every person counts) and ``haar``
    for one face per frame; any other name is itself."""
    if name != AUTO:
        return name
    return "mtcnn" if people else "haar"


def make_detector(name: str = "haar", min_size: int = 32, detect_height: Optional[int] = -1,
                  people: bool = False) -> FaceDetector:
    """A detector by name (one of :data:`DETECTORS`, or ``auto``: see :func:`resolve_detector`, with Haar
    where MTCNN cannot load); ``detect_height=-1`` keeps the detector's default.

    Raises :class:`DetectorUnavailable` naming what to install when its package is missing.
    """
    if name == AUTO:
        try:
            return make_detector(resolve_detector(name, people), min_size, detect_height)
        except DetectorUnavailable as exc:
            log.warning("detector auto: %s; using haar", exc)
            return make_detector("haar", min_size, detect_height)
    classes = {"haar": HaarDetector, "dlib-cnn": DlibCNNDetector, "dlib-hog": DlibHOGDetector,
               "mtcnn": MTCNNDetector}
    if name not in classes:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join((AUTO,) + DETECTORS)}")
    return classes[name](min_size=min_size, detect_height=detect_height)


def best_face(detections: Sequence[Detection], rel_score: float = 0.5) -> Optional[Detection]:
    """The face to keep: the largest box among those scoring at least ``rel_score`` × the best score.

    CAER frames often show several people; the largest face is usually the one the clip is about,
    and the score filter stops a big but doubtful detection from beating a clear one.
    """
    if not detections:
        return None
    top = max(d[4] for d in detections)
    confident = [d for d in detections if top <= 0 or d[4] >= rel_score * top]
    return max(confident, key=lambda d: ((d[2] - d[0]) * (d[3] - d[1]), d[4]))


def box_area(d: Sequence[float]) -> float:
    return float((d[2] - d[0]) * (d[3] - d[1]))


def faces_by_size(detections: Sequence[Detection], max_people: Optional[int] = None, min_score: Optional[float] = None,
                  rel_score: float = 0.0) -> List[Detection]:
    """Every face to keep, largest first (ties: higher score first), for multi-person inference.

    Args:
        detections: one frame's ``detect()`` output.
        max_people: keep at most this many (the largest); None keeps all.
        min_score: drop detections scoring below this (in the detector's own units); None: no floor.
        rel_score: also drop those below ``rel_score`` × the frame's best score (0: off), as
            :func:`best_face` does with 0.5 for the one-face path.
    """
    if max_people is not None and max_people < 1:
        raise ValueError(f"max_people must be >= 1 or None, got {max_people}")
    if not detections:
        return []
    top = max(d[4] for d in detections)
    kept = [d for d in detections
            if (min_score is None or d[4] >= min_score) and (top <= 0 or rel_score <= 0 or d[4] >= rel_score * top)]
    kept.sort(key=lambda d: (-box_area(d), -d[4]))
    return kept if max_people is None else kept[:max_people]
