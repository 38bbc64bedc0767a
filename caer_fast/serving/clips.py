"""The paper's test-time clip protocol, in one place: what the model sees of a video (or an image).

- resample to 10 fps (:func:`sample_indices`, the datasets' :func:`~caer_fast.data.datasets.resample_indices`);
- clips of the model's clip length every 8 sampled frames (:func:`clip_starts`, the datasets' rule); an input
  shorter than a clip gives one clip padded by repeating its last frame (so an image is a still clip);
- the video model (CAER-Net) gets one input per clip (3×T×h×w); the image model (CAER-Net-S) one input per
  sampled frame, and a clip's answer is the mean of its frames' (the middle frame's attention).

:class:`ClipSampler` is the input side (preprocessed frames in, :class:`Chunk` objects of model inputs out),
:class:`ClipPooler` the output side (a chunk's model outputs in, per-clip outputs out). They are separate so
the two sides can run in different threads or processes: a :class:`Chunk` is plain tensors, numpy arrays
and small Python values (picklable).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..constants import CLIP_FPS, TEST_CLIP_STRIDE
from ..data.datasets import clip_starts as _dataset_clip_starts, resample_indices


def sample_indices(num_frames: int, fps: float, target_fps: float = CLIP_FPS) -> np.ndarray:
    """Decode-order indices that resample a ``fps`` video at 10 fps: the datasets' rule, so a prediction
    sees the frames evaluation sees."""
    return np.asarray(resample_indices(num_frames, fps, target_fps), dtype=np.int64)


def clip_starts(num_frames: int, clip_frames: int, stride: int = TEST_CLIP_STRIDE) -> List[int]:
    """Starts of the test clips (the datasets' rule: stride 8, one padded clip if the input is short)."""
    return _dataset_clip_starts(num_frames, clip_frames, stride) or [0]


@dataclass
class Chunk:
    """Model inputs for a run of clips (video model) or sampled frames (image model) of one person.

    Picklable (tensors, numpy, small values): preprocessing may run in another process than the model.
    A multi-person producer emits one chunk per person and step (``person``); the model side may run
    several chunks in one call (the server's micro-batcher concatenates them)."""

    face: torch.Tensor  # n×3×(T×)h×w model face inputs
    context: torch.Tensor  # n×3×(T×)h×w model context inputs (face masked, centre crop)
    clips: List[Tuple[int, int]]  # (first, last) sampled positions of the clips complete once these inputs ran
    first_input: int  # number of the first input (image model: sampled frame; video model: clip)
    frames: List[tuple]  # (position, decode index, x1, y1, x2, y2, score) of newly sampled frames
    mid_frames: Dict[int, np.ndarray] = field(default_factory=dict)  # clip number → middle RGB frame (pictures)
    last: bool = False  # no more chunks for this person; ``total`` sampled frames
    total: int = 0
    person: int = 0  # whose inputs these are (-1: nobody, the context-only stream of a multi-person input)
    input_frames: int = 0  # multi-person: sampled frames of the whole input so far (people come and go)

    @property
    def n(self) -> int:
        return int(self.face.shape[0])


class ClipSampler:
    """Preprocessed sampled frames in (:meth:`add`, in order), :class:`Chunk` objects out (:meth:`take`).

    Keeps only the frames a later clip still needs (bounded memory whatever the input's length).

    Args:
        clip_frames: the model's clip length T.
        video_model: True for CAER-Net (one 3×T×h×w input per clip), False for CAER-Net-S (one input per frame).
        stride: sampled frames between clip starts (8 at test time).
        keep_frames: keep each clip's middle RGB frame (for pictures).
        person: the person id put on every chunk.
    """

    def __init__(self, clip_frames: int, video_model: bool, stride: int = TEST_CLIP_STRIDE, keep_frames: bool = False,
                 person: int = 0):
        self.clip_frames, self.video_model, self.stride = int(clip_frames), bool(video_model), int(stride)
        self.keep_frames, self.person = keep_frames, person
        # preprocessed frames from sampled position `base` on
        self._face: List[torch.Tensor] = []
        self._context: List[torch.Tensor] = []
        self._rgb: List[Optional[np.ndarray]] = []
        self._base = 0
        self.next_start = 0  # sampled position of the next clip
        self.clips_formed = 0
        self.frames_seen = 0
        self.closed = False
        # formed, not yet taken
        self._in_face: List[torch.Tensor] = []
        self._in_context: List[torch.Tensor] = []
        self._clips: List[Tuple[int, int]] = []
        self._meta: List[tuple] = []
        self._mid: Dict[int, np.ndarray] = {}
        self._first_input = 0

    @property
    def pending(self) -> int:
        """Model inputs formed and not yet taken."""
        return len(self._in_face)

    def add(self, face: torch.Tensor, context: torch.Tensor, frames: Sequence[tuple],
            rgb: Optional[Sequence[np.ndarray]] = None) -> None:
        """``face``/``context``: k×3×h×w preprocessed sampled frames; ``frames``: their k
        ``(position, decode index, x1, y1, x2, y2, score)``; ``rgb``: the k frames (kept for pictures)."""
        k = int(face.shape[0])
        self._face.extend(face.unbind(0))
        self._context.extend(context.unbind(0))
        self._rgb.extend(rgb if self.keep_frames and rgb is not None else [None] * k)
        self._meta.extend(frames)
        self.frames_seen += k
        if not self.video_model:  # each sampled frame is a model input
            self._in_face.extend(face.unbind(0))
            self._in_context.extend(context.unbind(0))
        self._form(final=False)

    def close(self) -> None:
        """End of input: form the last clips (one padded clip if the input was shorter than a clip)."""
        self.closed = True
        self._form(final=True)

    def _form(self, final: bool) -> None:
        t, base = self.clip_frames, self._base
        end = base + len(self._face)
        while self.next_start + t <= end:
            a = self.next_start
            self._add_clip(a, a + t - 1, list(range(a - base, a - base + t)))
            self.next_start += self.stride
        if final and self.clips_formed == 0 and end > 0:  # shorter than a clip: padded with its last frame
            self._add_clip(0, end - 1, [min(j, end - 1) - base for j in range(t)])
        # frames no later clip needs (clamped: with clips shorter than the stride the next start can lie
        # beyond the frames seen so far)
        drop = min(max(0, self.next_start - base), len(self._face)) if not final else 0
        if drop:
            self._face, self._context, self._rgb = self._face[drop:], self._context[drop:], self._rgb[drop:]
            self._base += drop

    def _add_clip(self, first: int, last: int, window_pos: List[int]) -> None:
        self._clips.append((first, last))
        if self.video_model:
            self._in_face.append(torch.stack([self._face[p] for p in window_pos], 1))  # T×(3×h×w) → 3×T×h×w
            self._in_context.append(torch.stack([self._context[p] for p in window_pos], 1))
        if self.keep_frames:
            self._mid[self.clips_formed] = self._rgb[(first + last) // 2 - self._base]
        self.clips_formed += 1

    def take(self, max_inputs: Optional[int] = None) -> Chunk:
        """The next chunk: at most ``max_inputs`` of the pending inputs (all when None). It is the ``last``
        one when the sampler is closed and nothing is left after it."""
        n = len(self._in_face) if max_inputs is None else min(len(self._in_face), int(max_inputs))
        face = torch.stack(self._in_face[:n]) if n else torch.empty(0)
        context = torch.stack(self._in_context[:n]) if n else torch.empty(0)
        end = self._first_input + n  # inputs first_input … end-1 go now
        if self.video_model:
            clips, self._clips = self._clips[:n], self._clips[n:]
        else:  # a clip of the image model is complete once its last frame has run
            clips = [c for c in self._clips if c[1] < end]
            self._clips = [c for c in self._clips if c[1] >= end]
        self._in_face, self._in_context = self._in_face[n:], self._in_context[n:]
        last = self.closed and not self._in_face
        chunk = Chunk(face, context, clips, self._first_input, self._meta, self._mid, last=last,
                      total=self.frames_seen, person=self.person)
        self._meta, self._mid = [], {}
        self._first_input = end
        return chunk


class ClipPooler:
    """A chunk's model outputs in (:meth:`add`), the outputs of the clips it completes out: the video
    model's per-clip outputs as they are; the image model's frames averaged per clip (probabilities and
    fusion weights; the attention of the clip's middle frame). Keeps the frames a later clip needs."""

    def __init__(self, video_model: bool, stride: int = TEST_CLIP_STRIDE):
        self.video_model, self.stride = bool(video_model), int(stride)
        self._per_frame: Dict[int, tuple] = {}  # image model: position → (probs, weights, attention)
        self.clips_done = 0

    def add(self, chunk: Chunk, probs: torch.Tensor, attention: torch.Tensor,
            weights: torch.Tensor) -> List[Tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(first, last, probabilities, fusion weights, attention)`` of each clip ``chunk`` completes."""
        out = []
        if not self.video_model:
            for j in range(chunk.n):
                self._per_frame[chunk.first_input + j] = (probs[j], weights[j], attention[j])
        for j, (a, b) in enumerate(chunk.clips):
            if self.video_model:
                out.append((a, b, probs[j], weights[j], attention[j]))
            else:
                rows = [self._per_frame[q] for q in range(a, b + 1)]
                out.append((a, b, torch.stack([r[0] for r in rows]).mean(0), torch.stack([r[1] for r in rows]).mean(0),
                            self._per_frame[(a + b) // 2][2]))
        self.clips_done += len(chunk.clips)
        if not self.video_model and self._per_frame:  # frames no later clip needs
            keep_from = self.clips_done * self.stride if not chunk.last else 0
            for q in [q for q in self._per_frame if q < keep_from]:
                del self._per_frame[q]
        return out
