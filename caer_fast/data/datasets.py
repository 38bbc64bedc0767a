"""CAER (video) and CAER-S (image) datasets: clip sampling, face boxes, augmentation.

Layouts (DESIGN.md §2, API.md "Face boxes on disk")::

    CAER/{train,validation,test}/<Emotion>/*.avi     boxes: CAER/<split>.faces.csv (paths relative to CAER/)
    CAER-S/{train,test}/<Emotion>/*.png              boxes: CAER-S/<split>.txt (paths relative to CAER-S/<split>/)

Class folders are named as :data:`caer_fast.constants.CLASSES`. A split with a class folder missing, a
misnamed one (``sad`` for ``Sad``) or an extra one (``Contempt``) gets a :class:`ClassFolderWarning` naming
them (``strict=True``: a :class:`DatasetError`); files outside the class folders are not used.
A frame (or image) without a box line has no face: its face tensor is zeros and nothing is masked.

Clip sampling (paper): every video is resampled to ``fps`` (10) by taking decode-order frames
``floor(k · native_fps / fps)``; training takes non-overlapping clips of ``clip_frames``, testing takes
clips every ``test_stride`` frames (16-frame clips with stride 8 overlap by 8). Frames left over at the
end that do not fill a clip are not used. A video shorter than one clip gives a single clip padded by
repeating its last frame. The prediction for a video is the mean over its clips (use ``sample["video"]``).

Augmentation (``train=True``), the same for every frame of a clip: a random ``crop``×``crop`` window of
the resized context (centre window when testing), a horizontal flip of face and context with probability
``flip_p``, and colour jitter (see :func:`color_jitter_`).

Bad inputs never stop a run: files that cannot be probed at index time and malformed box lines go to
``bad_files``; a file that fails to decode in ``__getitem__`` returns ``None`` (and a warning naming it;
it is also appended to ``failures`` in the process that read it), which :func:`collate` drops and counts
in ``skipped``. ``strict=True`` raises instead, naming the file. A truncated video (fewer frames decode than
its header lists, or decoding breaks off midway) keeps the frames that decode and is named in ``truncated``
as "truncated / partly decodable" (``strict=True``: an error).
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..constants import (CLASSES, CLIP_FPS, CLIP_FRAMES, CONTEXT_CROP, CONTEXT_SIZE, FACE_SIZE,
                         IMAGENET_MEAN, IMAGENET_STD, TEST_CLIP_STRIDE)
from ..ops import face_context
from ..ops.face_context import clip_boxes
from . import boxes as boxes_io
from .index_cache import ProbeCache
from .tree import check_class_folders
from .video import (IMAGE_EXTENSIONS, MediaDecodeError, VIDEO_EXTENSIONS, VideoInfo, decode_video, _open,
                    probe_video, read_image)

log = logging.getLogger(__name__)

Box = Tuple[int, int, int, int]
NO_FACE: Box = (0, 0, 0, 0)

__all__ = ["CAERVideoDataset", "CAERSImageDataset", "collate", "resample_indices", "clip_starts",
           "color_jitter_", "DatasetError", "Skipped", "ClassFolderWarning", "check_class_folders",
           "TRUNCATED"]

# Reasons that start with this mark a file that decodes only in part (kept or skipped, never silent).
TRUNCATED = "truncated / partly decodable"


class ClassFolderWarning(UserWarning):
    """A split whose emotion folders are missing, misnamed or joined by others."""


class DatasetError(RuntimeError):
    """A bad input met in ``strict`` mode (or a dataset that cannot be used at all); names the file."""


class Skipped(NamedTuple):
    """What ``__getitem__`` returns for a sample it could not read; :func:`collate` drops and names it."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# --- clip sampling ----------------------------------------------------------------------------------

def resample_indices(num_frames: int, native_fps: float, fps: float = CLIP_FPS) -> List[int]:
    """Decode-order frame indices that resample a ``num_frames`` video from ``native_fps`` to ``fps``.

    Frame ``k`` of the resampled video is decoded frame ``floor(k · native_fps / fps)``; a video whose
    rate is already at or below ``fps`` keeps every frame.

    >>> resample_indices(24, 25.0, 10.0)
    [0, 2, 5, 7, 10, 12, 15, 17, 20, 22]
    >>> resample_indices(5, 8.0, 10.0)
    [0, 1, 2, 3, 4]
    """
    if num_frames <= 0:
        return []
    if not native_fps or native_fps <= fps:
        return list(range(num_frames))
    step = native_fps / fps
    count = math.ceil(num_frames / step - 1e-9)
    # the epsilon guards 3·(30/10) = 8.999… style float error from skipping a frame
    out = [int(math.floor(k * step + 1e-6)) for k in range(count)]
    return [i for i in out if i < num_frames]


def clip_starts(length: int, clip_frames: int, stride: int) -> List[int]:
    """Start positions of clips over a resampled video of ``length`` frames.

    Training uses ``stride = clip_frames`` (non-overlapping), testing ``stride = test_stride``.
    A video shorter than one clip still gives one clip (start 0; the caller pads it).

    >>> clip_starts(40, 16, 16), clip_starts(40, 16, 8), clip_starts(10, 16, 8)
    ([0, 16], [0, 8, 16, 24], [0])
    """
    if length <= 0:
        return []
    if length < clip_frames:
        return [0]
    return list(range(0, length - clip_frames + 1, max(1, int(stride))))


# --- augmentation -----------------------------------------------------------------------------------

def color_jitter_(tensors: Sequence[torch.Tensor], brightness: float, contrast: float, saturation: float,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
    """Colour/contrast jitter, in place, on normalised 3×… tensors (channel first), one factor set for all.

    Works on the [0, 1] image behind the normalisation: ``x = z·std + mean``, then
    ``x ← x·brightness``; ``x ← g + (x − g)·contrast`` with g the mean grey level of that tensor;
    ``x ← y + (x − y)·saturation`` with y the per-pixel grey (0.299 R + 0.587 G + 0.114 B); clamp to
    [0, 1]; normalise back. (torchvision's ColorJitter formulas, applied after normalisation.)

    >>> z = torch.zeros(3, 2, 4, 4)
    >>> color_jitter_([z], 1.0, 1.0, 1.0); bool(z.abs().max() < 1e-5)
    True
    """
    for z in tensors:
        shape = (3,) + (1,) * (z.dim() - 1)
        m = torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)  # device: the DALI GPU path
        s = torch.tensor(std, dtype=z.dtype, device=z.device).view(shape)
        x = z * s + m
        x = x * brightness
        grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
        g = grey.mean()
        x = g + (x - g) * contrast
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
        x = grey + (x - grey) * saturation
        z.copy_((x.clamp_(0.0, 1.0) - m) / s)


def _index_progress(total: int, desc: str):
    """A progress bar for indexing long splits (probing decodes each new video once); quiet for small ones."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="video", leave=False, dynamic_ncols=True, disable=total < 200)


def _scan_classes(split_dir: Path, extensions: Sequence[str], strict: bool = False) -> List[Tuple[Path, int]]:
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: no such split folder (expected <root>/<split>/<Emotion>/…)")
    problem = check_class_folders(split_dir)
    if problem is not None:
        if strict:
            raise DatasetError(f"{problem} (--strict)")
        warnings.warn(problem, ClassFolderWarning, stacklevel=3)
    found = []
    for sub in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if sub.name not in CLASSES:
            continue
        label = CLASSES.index(sub.name)
        for f in sorted(sub.iterdir()):
            if f.is_file() and f.suffix.lower() in extensions and not f.name.startswith("."):
                found.append((f, label))
    if not found:
        raise DatasetError(f"{split_dir}: no files with extensions {tuple(extensions)} in class folders {CLASSES}")
    return found


class _Base(Dataset):
    classes = CLASSES

    def __init__(self, root, split, train, face_size, context_size, crop, strict, flip_p, color_jitter):
        self.root = Path(root)
        self.split = str(split)
        self.train = bool(train)
        self.face_size = (int(face_size[0]), int(face_size[1]))
        self.context_size = (int(context_size[0]), int(context_size[1]))
        self.crop = None if crop is None else int(crop)
        if self.crop is not None and (self.crop > self.context_size[0] or self.crop > self.context_size[1]):
            raise ValueError(f"crop {self.crop} is larger than context_size {self.context_size}")
        self.strict = bool(strict)
        self.flip_p = float(flip_p) if train else 0.0
        self.color_jitter = bool(color_jitter) and train
        self.bad_files: List[Tuple[str, str]] = []
        self.truncated: List[Tuple[str, str]] = []  # kept, with the frames that decode
        self.failures: List[Tuple[str, str]] = []  # decode failures seen by __getitem__ in this process

    def _bad(self, path, reason: str) -> None:
        if self.strict:
            raise DatasetError(f"{path}: {reason}")
        self.bad_files.append((str(path), reason))

    def _read_box_lines(self, path: Optional[Path], default: Path, reader):
        path_given = path is not None
        path = Path(path) if path_given else default
        if not path.is_file():
            if path_given:
                raise DatasetError(f"{path}: face-box file not found")
            warnings.warn(f"{path}: no face-box file; every frame is treated as having no face "
                          f"(run `python -m caer_fast.faces --data {self.root}` to make one)", stacklevel=3)
            return {}
        table, bad = reader(path)
        for b in bad:
            self._bad(f"{b.file}:{b.line}", b.reason)
        return table

    def _crop_window(self) -> Optional[Tuple[int, int, int, int]]:
        if self.crop is None:
            return None
        h, w = self.context_size
        if self.train:
            top = int(torch.randint(0, h - self.crop + 1, ()).item())
            left = int(torch.randint(0, w - self.crop + 1, ()).item())
        else:
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
        return top, left, self.crop, self.crop

    def _process(self, frames: np.ndarray, boxes: List[Box]) -> Tuple[torch.Tensor, torch.Tensor]:
        """One face_context call on all frames → (face T×3×fh×fw, context T×3×c×c), augmented."""

        if not frames.flags.writeable or not frames.flags.c_contiguous:  # PIL arrays are read-only
            frames = np.array(frames, order="C")
        face, context = face_context(torch.from_numpy(frames),
                                     torch.tensor(boxes, dtype=torch.int64).view(-1, 4),
                                     self.face_size, self.context_size, crop=self._crop_window())
        b_t = clip_boxes(torch.tensor(boxes, dtype=torch.int64).view(-1, 4), frames.shape[1], frames.shape[2])
        return self._augment(face, context, b_t[:, 2] > b_t[:, 0])

    def _augment(self, face: torch.Tensor, context: torch.Tensor, has_face: torch.Tensor):
        """Flip and colour jitter of one clip (T×3×h×w, any device); ``has_face`` is a T bool mask.

        Shared with the DALI loader, which calls face_context once per batch and then this per clip.
        """
        if self.train and self.flip_p > 0 and torch.rand(()).item() < self.flip_p:
            face, context = face.flip(-1), context.flip(-1)
        if self.color_jitter:
            br, co, sa = (1.0 + 0.4 * (torch.rand(3) - 0.5)).tolist()  # each factor in [0.8, 1.2]
            # keep "no face" frames exactly zero, as face_context returns them
            f2, c2 = face.transpose(0, 1).contiguous(), context.transpose(0, 1).contiguous()
            color_jitter_([f2, c2], br, co, sa)
            face, context = f2.transpose(0, 1) * has_face.to(face.dtype).view(-1, 1, 1, 1), c2.transpose(0, 1)
        return face, context

    def _failed(self, path, exc: Exception):
        reason = getattr(exc, "problem", None) or f"{exc.__class__.__name__}: {exc}"
        if self.strict:
            raise DatasetError(f"{path}: {reason}") from exc
        self.failures.append((str(path), reason))
        log.warning("skipping %s: %s", path, reason)
        return Skipped(str(path), reason)


def _decodable_part(path) -> Tuple[VideoInfo, int, str]:
    """(info with the frames that decode before the first error, the header's frame count, that error)."""

    container = _open(path)
    n, err = 0, ""
    try:
        stream = container.streams.video[0]
        header = int(stream.frames or 0)
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        try:
            for _ in container.decode(stream):
                n += 1
        except Exception as exc:  # FFmpeg's errors on a damaged stream
            err = f"{exc.__class__.__name__}: {str(exc)[:120]}"
        info = VideoInfo(str(path), n, fps, stream.codec_context.width, stream.codec_context.height,
                         stream.codec_context.name)
    finally:
        container.close()
    return info, header, err


def _probe(path, count_frames: bool):
    """probe_video plus a truncation check: ``(info, note)``; note says what is missing, "" when whole.

    FFmpeg reads most cut-off files without an error, just shorter: when the decoded count falls short of
    the container header's (by more than 5 % and 2 frames), the file is truncated. A stream that breaks
    off with an error after some frames keeps those frames.
    """
    try:
        info = probe_video(path, count_frames=count_frames)
    except MediaDecodeError as exc:
        if not exc.problem.startswith("decoding failed"):
            raise
        info, _header, err = _decodable_part(path)
        if info.num_frames == 0:
            raise
        n = info.num_frames
        return info, f"{TRUNCATED}: decoding breaks off after {n} frames ({err}); using those {n}"
    if count_frames:

        container = _open(path)
        try:
            header = int(container.streams.video[0].frames or 0)
        finally:
            container.close()
        if header > 0 and info.num_frames < header - max(2, header // 20):
            return info, (f"{TRUNCATED}: {info.num_frames} of the {header} frames its header lists decode; "
                          f"using those {info.num_frames}")
    return info, ""


class CAERVideoDataset(_Base):
    """CAER clips: ``dict(face=3×T×fh×fw, context=3×T×crop×crop, label, video)`` per clip.

    Args:
        root: the CAER folder (holding ``train/``, ``validation/``, ``test/`` and the box files).
        split: "train", "validation" or "test" (any folder name works).
        train: random crop, flip and colour jitter, non-overlapping clips; else centre crop and clips
            every ``test_stride`` frames.
        clip_frames, fps, test_stride: clip sampling (see the module docstring).
        face_size, context_size, crop: sizes passed to :func:`caer_fast.ops.face_context`.
        boxes_file: default ``root/<split>.faces.csv``; a missing default means "no faces" (warning).
        strict: raise :class:`DatasetError` naming the file instead of skipping bad inputs.
        count_frames: count frames by decoding at index time (exact; default) instead of trusting the
            container header.
        index_cache: keep each video's probe result (frame count, rate, codec) between runs, keyed by
            path, size and modification time (:mod:`caer_fast.data.index_cache`), so only the first
            run decodes every video to count frames.

    Attributes: ``classes``, ``videos`` [(path relative to root, label)], ``clips``
    [(video index, decode-order frame indices)], ``bad_files`` [(path, reason)].

    Example:
        >>> ds = CAERVideoDataset("demo/CAER", "test", train=False)   # doctest: +SKIP
        >>> s = ds[0]; s["face"].shape, s["context"].shape               # doctest: +SKIP
        (torch.Size([3, 16, 96, 96]), torch.Size([3, 16, 112, 112]))
    """

    def __init__(self, root, split, *, train: bool, clip_frames: int = CLIP_FRAMES, fps: float = CLIP_FPS,
                 test_stride: int = TEST_CLIP_STRIDE, face_size=FACE_SIZE, context_size=CONTEXT_SIZE,
                 crop: Optional[int] = CONTEXT_CROP, boxes_file=None, strict: bool = False, flip_p: float = 0.5,
                 color_jitter: bool = True, count_frames: bool = True, index_cache: bool = True):
        super().__init__(root, split, train, face_size, context_size, crop, strict, flip_p, color_jitter)
        self.clip_frames, self.fps, self.test_stride = int(clip_frames), float(fps), int(test_stride)
        if self.clip_frames < 1 or self.fps <= 0 or self.test_stride < 1:
            raise ValueError("clip_frames, fps and test_stride must be positive")
        files = _scan_classes(self.root / self.split, VIDEO_EXTENSIONS, self.strict)
        table = self._read_box_lines(boxes_file, boxes_io.video_boxes_path(self.root, self.split),
                                     boxes_io.read_video_boxes)
        self.videos: List[Tuple[str, int]] = []
        self.num_frames: List[int] = []  # decoded frame count of each video
        self.native_fps: List[float] = []
        self.codecs: List[str] = []  # FFmpeg codec name of each video (the DALI loader checks it)
        self.clips: List[Tuple[int, Tuple[int, ...]]] = []
        self._boxes: List[Dict[int, Box]] = []
        stride = self.clip_frames if self.train else self.test_stride
        cache = ProbeCache(self.root, self.split, count_frames, enabled=index_cache)
        bar = _index_progress(len(files), f"indexing {self.root.name}/{self.split}")
        try:
            for path, label in files:
                bar.update()
                rel = path.relative_to(self.root).as_posix()
                info = cache.get(path)
                if info is None:
                    try:
                        info, note = _probe(path, count_frames)
                    except MediaDecodeError as exc:
                        self._bad(path, exc.problem)
                        continue
                    if note:  # not cached: reported again on every run
                        if self.strict:
                            raise DatasetError(f"{path}: {note}")
                        self.truncated.append((str(path), note))
                    else:
                        cache.put(path, info)
                v = len(self.videos)
                self.videos.append((rel, label))
                self.num_frames.append(info.num_frames)
                self.native_fps.append(info.fps)
                self.codecs.append(info.codec)
                self._boxes.append({f: b for f, (b, _score) in table.get(rel, {}).items()})
                idx = resample_indices(info.num_frames, info.fps, self.fps)
                for s in clip_starts(len(idx), self.clip_frames, stride):
                    sel = idx[s:s + self.clip_frames]
                    sel = sel + [sel[-1]] * (self.clip_frames - len(sel))  # pad short videos with the last frame
                    self.clips.append((v, tuple(sel)))
        finally:
            bar.close()
            cache.save()
        if not self.videos:
            raise DatasetError(f"{self.root / self.split}: no readable videos ({len(self.bad_files)} unreadable)")

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int):
        v, indices = self.clips[i]
        rel, label = self.videos[v]
        path = self.root / rel
        try:
            frames = decode_video(path, indices=indices).frames
        except MediaDecodeError as exc:
            return self._failed(path, exc)
        boxes = [self._boxes[v].get(k, NO_FACE) for k in indices]
        face, context = self._process(frames, boxes)
        # T×3×H×W → 3×T×H×W (Conv3d layout)
        return dict(face=face.transpose(0, 1).contiguous(), context=context.transpose(0, 1).contiguous(),
                    label=int(label), video=int(v))


class CAERSImageDataset(_Base):
    """CAER-S images: ``dict(face=3×fh×fw, context=3×crop×crop, label, video=image index)``.

    Args are those of :class:`CAERVideoDataset` without clip sampling; ``boxes_file`` defaults to
    ``root/<split>.txt`` (community CSV, paths relative to ``root/<split>``; a ``<split>/`` prefix is
    also accepted). ``videos`` lists the images as (path relative to root, label).

    Example:
        >>> ds = CAERSImageDataset("demo/CAER-S", "train", train=True)   # doctest: +SKIP
        >>> ds[0]["face"].shape                                           # doctest: +SKIP
        torch.Size([3, 96, 96])
    """

    def __init__(self, root, split, *, train: bool, face_size=FACE_SIZE, context_size=CONTEXT_SIZE,
                 crop: Optional[int] = CONTEXT_CROP, boxes_file=None, strict: bool = False, flip_p: float = 0.5,
                 color_jitter: bool = True):
        super().__init__(root, split, train, face_size, context_size, crop, strict, flip_p, color_jitter)
        files = _scan_classes(self.root / self.split, IMAGE_EXTENSIONS, self.strict)
        table = self._read_box_lines(boxes_file, boxes_io.image_boxes_path(self.root, self.split),
                                     boxes_io.read_image_boxes)
        prefix = self.split + "/"
        by_path = {(k[len(prefix):] if k.startswith(prefix) else k): box for k, (_label, box) in table.items()}
        self.videos: List[Tuple[str, int]] = []
        self._boxes: List[Box] = []
        for path, label in files:
            if path.stat().st_size == 0:  # cheap index-time check; other damage shows at read time
                self._bad(path, "empty file (0 bytes)")
                continue
            self.videos.append((path.relative_to(self.root).as_posix(), label))
            self._boxes.append(by_path.get(path.relative_to(self.root / self.split).as_posix(), NO_FACE))
        self.clips = [(i, (0,)) for i in range(len(self.videos))]
        if not self.videos:
            raise DatasetError(f"{self.root / self.split}: no readable images")

    @property
    def images(self) -> List[Tuple[str, int]]:
        return self.videos

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int):
        rel, label = self.videos[i]
        path = self.root / rel
        try:
            frame = read_image(path)
        except MediaDecodeError as exc:
            return self._failed(path, exc)
        face, context = self._process(frame[None], [self._boxes[i]])
        return dict(face=face[0], context=context[0], label=int(label), video=int(i))


def collate(batch):
    """Stack dataset samples, dropping failed reads (:class:`Skipped` or ``None``).

    ``skipped`` counts them and ``skipped_items`` names them ("path: reason"), so a trainer can report
    them even when they happened in DataLoader worker processes. When every sample of the batch
    failed, ``face`` and ``context`` are ``None`` and ``label`` is empty: skip such a batch.

    >>> s = dict(face=torch.zeros(3, 4, 4), context=torch.zeros(3, 5, 5), label=2, video=7)
    >>> out = collate([s, Skipped("a.avi", "empty file"), s])
    >>> out["face"].shape, out["label"].tolist(), out["skipped"], out["skipped_items"]
    (torch.Size([2, 3, 4, 4]), [2, 2], 1, ['a.avi: empty file'])
    """
    items = [b for b in batch if isinstance(b, dict)]
    skipped_items = [str(b) for b in batch if isinstance(b, Skipped)]
    skipped = len(batch) - len(items)
    if not items:
        return dict(face=None, context=None, label=torch.zeros(0, dtype=torch.long),
                    video=torch.zeros(0, dtype=torch.long), skipped=skipped, skipped_items=skipped_items)
    return dict(face=torch.stack([b["face"] for b in items]), context=torch.stack([b["context"] for b in items]),
                label=torch.tensor([b["label"] for b in items], dtype=torch.long),
                video=torch.tensor([b["video"] for b in items], dtype=torch.long), skipped=skipped,
                skipped_items=skipped_items)
