"""NVIDIA DALI loader for :class:`~caer_fast.data.datasets.CAERVideoDataset` clips (``--loader dali``).

The dataset still does the indexing (files, labels, 10 fps clip sampling, face boxes); DALI decodes.
One ``@pipeline_def`` pipeline takes, per clip, the file's bytes and its decode-order frame indices from
an ``external_source`` and decodes exactly those frames with ``fn.decoders.video``:

- ``device="cuda"``: the ``mixed`` decoder (NVDEC: H.264, HEVC, MPEG-4, AV1, VP8/VP9, MJPEG); frames
  stay on the GPU, go through :func:`caer_fast.ops.face_context` there (Triton/CUDA backend) and on to
  the model with no host round-trip.
- ``device="cpu"``: DALI's CPU decoder, which reads only VP8, VP9 and MJPEG. Codecs are checked up front
  (PyAV, at index time): other files raise :class:`UnsupportedCodecError` naming each file and its codec,
  or with ``unsupported="skip"`` their clips are dropped and reported in every batch's ``skipped_items``.

Batches are the dicts of :func:`caer_fast.data.datasets.collate` (``face`` N×3×T×fh×fw, ``context``,
``label``, ``video``, ``skipped``, ``skipped_items``). :func:`face_context` runs once per batch and frame
size on a GPU (N·T frames in one call), once per clip on a CPU (measured faster there); flip and colour
jitter are then applied per clip with the dataset's own code, so augmentation matches the torch loader.

Example::

    from caer_fast.data.datasets import CAERVideoDataset
    from caer_fast.data.dali_loader import DALIVideoLoader
    ds = CAERVideoDataset("CAER", "test", train=False)
    for batch in DALIVideoLoader(ds, batch_size=8, device="cuda"):
        logits = model(batch["face"], batch["context"])
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..ops import face_context
from ..ops.face_context import clip_boxes
from .datasets import NO_FACE, CAERVideoDataset, DatasetError
from .video import probe_video

__all__ = ["DALIVideoLoader", "make_dali_loader", "UnsupportedCodecError", "CPU_CODECS", "dali_available", "clip_pipeline"]

# FFmpeg names of the codecs DALI's CPU video decoder reads (DALI 2.4 docs: VP8, VP9, MJPEG).
CPU_CODECS = ("vp8", "vp9", "mjpeg")
INSTALL_HINT = "pip install nvidia-dali-cuda130 (the bare `nvidia-dali` name is a placeholder package)"


class UnsupportedCodecError(DatasetError):
    """Files whose codec DALI's CPU decoder cannot read; the message names each file and codec."""


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin import pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _require_dali():
    try:
        import nvidia.dali as dali
    except Exception as exc:
        raise ImportError(f"--loader dali needs NVIDIA DALI ({exc.__class__.__name__}: {exc}); {INSTALL_HINT}; "
                          f"or use --loader torch (PyAV, every codec)") from None
    return dali


def clip_pipeline(source, decode_device: str = "cpu", **pipeline_kwargs):
    """The DALI pipeline: per clip (bytes, frame indices) → uint8 frames T×H×W×3 (+ index passthrough).

    ``source`` is an iterable of batches ``(encoded: [uint8 1-D], indices: [int32 T], sample: [int64 1])``;
    its StopIteration ends the epoch. ``decode_device`` is ``"cpu"`` or ``"mixed"`` (GPU output).
    """
    dali = _require_dali()
    from nvidia.dali import fn, types

    @dali.pipeline_def
    def _pipe():
        encoded, indices, sample = fn.external_source(source=source, num_outputs=3, batch=True,
                                                      dtype=[types.UINT8, types.INT32, types.INT64])
        # frames= takes the exact decode-order indices the dataset chose (10 fps, padding repeats)
        frames = fn.decoders.video(encoded, device=decode_device, frames=indices)
        return frames, sample

    return _pipe(**pipeline_kwargs)


class _Source:
    """Feeds the pipeline one batch of clips at a time: file bytes, frame indices, sample id."""

    def __init__(self, dataset: CAERVideoDataset, batches: Sequence[List[int]]):
        self.dataset, self.batches = dataset, batches
        self._bytes: Dict[int, np.ndarray] = {}  # the last file read, reused by consecutive clips of it

    def __iter__(self):
        self._it = iter(self.batches)
        return self

    def __next__(self):
        idx = next(self._it)
        enc, ind, ids = [], [], []
        for i in idx:
            v, frames = self.dataset.clips[i]
            if v not in self._bytes:
                self._bytes = {v: np.fromfile(self.dataset.root / self.dataset.videos[v][0], dtype=np.uint8)}
            enc.append(self._bytes[v])
            ind.append(np.asarray(frames, dtype=np.int32))
            ids.append(np.asarray([i], dtype=np.int64))
        return enc, ind, ids


class DALIVideoLoader:
    """Iterable of collate-style batches of ``dataset``'s clips, decoded by DALI.

    Args:
        dataset: a :class:`CAERVideoDataset` (its ``train`` flag picks random crop/flip/jitter).
        batch_size: clips per batch; the last batch may be smaller (``PARTIAL``) unless ``drop_last``.
        shuffle, generator: a new random order each ``iter()`` (like DataLoader's).
        sampler: any iterable of sample indices (e.g. a ``DistributedSampler``); overrides ``shuffle``.
        device: ``"cpu"`` (VP8/VP9/MJPEG only) or ``"cuda"``/``"cuda:N"`` (NVDEC; outputs on that GPU).
        num_threads: DALI CPU threads.
        unsupported: ``"error"`` (default) or ``"skip"`` for files the CPU decoder cannot read.
    """

    def __init__(self, dataset: CAERVideoDataset, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, sampler=None, generator: Optional[torch.Generator] = None,
                 device="cpu", num_threads: int = 2, prefetch: int = 2, unsupported: str = "error"):
        _require_dali()
        if not isinstance(dataset, CAERVideoDataset):
            raise TypeError(f"DALIVideoLoader reads CAERVideoDataset clips, got {type(dataset).__name__} "
                            f"(CAER-S images: use --loader torch)")
        if unsupported not in ("error", "skip"):
            raise ValueError(f"unsupported must be 'error' or 'skip', got {unsupported!r}")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.drop_last, self.sampler, self.generator = shuffle, drop_last, sampler, generator
        self.device = torch.device(device)
        self.num_threads, self.prefetch = int(num_threads), int(prefetch)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"DALIVideoLoader(device={device!r}): this torch has no CUDA device; use "
                               f"device='cpu' (VP8/VP9/MJPEG files only) or --loader torch")
        # videos DALI cannot decode on this device → {video index: reason}
        self.unsupported: Dict[int, str] = {}
        if self.device.type == "cpu":
            for v, codec in enumerate(getattr(dataset, "codecs", None) or self._probe_codecs()):
                if codec not in CPU_CODECS:
                    self.unsupported[v] = (f"codec {codec} needs a GPU (DALI decodes it with NVDEC only; its CPU "
                                           f"decoder reads {', '.join(CPU_CODECS)}): use --device cuda or "
                                           f"--loader torch")
        if self.unsupported:
            lines = [f"{dataset.root / dataset.videos[v][0]}: {why}" for v, why in sorted(self.unsupported.items())]
            shown = "\n  ".join(lines[:10]) + (f"\n  … and {len(lines) - 10} more" if len(lines) > 10 else "")
            if unsupported == "error" or len(self.unsupported) == len(dataset.videos):
                raise UnsupportedCodecError(f"DALI on CPU cannot decode {len(lines)} of {len(dataset.videos)} "
                                            f"videos:\n  {shown}")
            warnings.warn(f"DALI on CPU skips {len(lines)} of {len(dataset.videos)} videos:\n  {shown}",
                          stacklevel=2)

    def _probe_codecs(self) -> List[str]:

        return [probe_video(self.dataset.root / rel, count_frames=False).codec for rel, _ in self.dataset.videos]

    def _order(self) -> List[int]:
        if self.sampler is not None:
            return [int(i) for i in self.sampler]
        if self.shuffle:
            return torch.randperm(len(self.dataset), generator=self.generator).tolist()
        return list(range(len(self.dataset)))

    def _batches(self) -> List[List[int]]:
        order = self._order()
        out = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        batches = self._batches()
        kept = [[i for i in b if self.dataset.clips[i][0] not in self.unsupported] for b in batches]
        to_decode = [k for k in kept if k]
        pipe = None
        if to_decode:
            gpu = self.device.type == "cuda"
            pipe = clip_pipeline(_Source(self.dataset, to_decode), decode_device="mixed" if gpu else "cpu",
                                 batch_size=self.batch_size, num_threads=self.num_threads,
                                 device_id=(self.device.index or 0) if gpu else None,
                                 prefetch_queue_depth=self.prefetch, seed=0)  # no random DALI ops; torch RNG untouched
            pipe.build()
        for b, k in zip(batches, kept):
            skipped_items = [f"{self.dataset.videos[self.dataset.clips[i][0]][0]}: "
                             f"{self.unsupported[self.dataset.clips[i][0]]}" for i in b if i not in set(k)]
            if not k:
                yield dict(face=None, context=None, label=torch.zeros(0, dtype=torch.long),
                           video=torch.zeros(0, dtype=torch.long), skipped=len(b), skipped_items=skipped_items)
                continue
            try:
                frames, sample = pipe.run()
            except RuntimeError as exc:
                files = sorted({self.dataset.videos[self.dataset.clips[i][0]][0] for i in k})
                raise DatasetError(f"DALI failed to decode a batch of {', '.join(files)} "
                                   f"(under {self.dataset.root}): {str(exc).strip().splitlines()[-1][:300]}") from exc
            batch = self._assemble(frames, sample)
            batch["skipped"], batch["skipped_items"] = len(b) - len(k), skipped_items
            yield batch

    def _to_torch(self, tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # zero-copy view of DALI's GPU buffer; consumed before the next run()
            return torch.from_dlpack(tensor)
        return torch.from_numpy(np.asarray(tensor))

    def _assemble(self, frames_tl, sample_tl) -> dict:

        ds = self.dataset
        ids = [int(np.asarray(sample_tl[j])[0]) for j in range(len(sample_tl))]
        clips = [self._to_torch(frames_tl[j]) for j in range(len(ids))]
        # GPU: clips of one frame size share one face_context call (fewer launches). CPU: one call per clip,
        # measured faster there (bench/RESULTS.md "data loading (issue 4)": per batch was 1.2-1.6x slower)
        groups: Dict[tuple, List[int]] = {}
        for j, c in enumerate(clips):
            key = tuple(c.shape[1:3]) if self.device.type == "cuda" else (j,)
            groups.setdefault(key, []).append(j)
        per_clip = [None] * len(ids)  # (face T×3×fh×fw, context, has_face) before augmentation
        for members in groups.values():
            h, w = clips[members[0]].shape[1:3]
            boxes = []
            for j in members:
                v, indices = ds.clips[ids[j]]
                boxes.extend(ds._boxes[v].get(k, NO_FACE) for k in indices)
            boxes_t = torch.tensor(boxes, dtype=torch.int64).view(-1, 4)
            stacked = clips[members[0]] if len(members) == 1 else torch.cat([clips[j] for j in members])
            # testing: one centre crop for all; training: a random window per clip, cut below
            face, context = face_context(stacked, boxes_t.to(stacked.device), ds.face_size, ds.context_size,
                                         crop=None if ds.train else ds._crop_window())
            b = clip_boxes(boxes_t, h, w)
            has_face = (b[:, 2] > b[:, 0]).to(face.device)
            t0 = 0
            for j in members:
                t = clips[j].shape[0]
                per_clip[j] = (face[t0:t0 + t], context[t0:t0 + t], has_face[t0:t0 + t])
                t0 += t
        faces, contexts = [], []
        for f, c, has_face in per_clip:  # in batch order: the same random draws as the torch loader
            if ds.train and ds.crop is not None:
                top, left, ch, cw = ds._crop_window()
                c = c[:, :, top:top + ch, left:left + cw]
            f, c = ds._augment(f, c, has_face)
            faces.append(f)
            contexts.append(c)
        labels = [ds.videos[ds.clips[i][0]][1] for i in ids]
        videos = [ds.clips[i][0] for i in ids]
        dev = self.device
        return dict(face=torch.stack([f.transpose(0, 1) for f in faces]).contiguous(),
                    context=torch.stack([c.transpose(0, 1) for c in contexts]).contiguous(),
                    label=torch.tensor(labels, dtype=torch.long, device=dev),
                    video=torch.tensor(videos, dtype=torch.long, device=dev))


def make_dali_loader(dataset, args, train: bool, epoch: int = 0, distributed: bool = False) -> DALIVideoLoader:
    """``--loader dali`` for :mod:`caer_fast.train`: the same order, seeding and batching as its DataLoader.

    Device: ``--device`` (default CUDA if available; under torchrun the process's current GPU). On CPU,
    files DALI cannot decode stop the run with ``--strict`` and are skipped and reported otherwise.
    """
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sampler = None
    if distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=train, seed=args.seed)
        sampler.set_epoch(epoch)
    return DALIVideoLoader(dataset, args.batch_size, shuffle=train and sampler is None, sampler=sampler,
                           generator=torch.Generator().manual_seed(args.seed * 1000 + epoch),
                           drop_last=train and len(dataset) > args.batch_size, device=device,
                           num_threads=max(1, int(args.workers)), unsupported="error" if args.strict else "skip")
