"""Video data loading, frames/s, side by side on the same files (issue 4).

Run: ``OMP_NUM_THREADS=1 pytest bench/test_data.py --benchmark-only --benchmark-group-by=group``
(7 rounds after 2 warm-ups, median).

The files: 6 clips of 360×640, 40 frames at 25 fps (3 VP9 .webm, 3 MJPEG .avi: the codecs DALI's CPU
decoder reads), sampled at 10 fps into one 16-frame clip each (CAER sizes: face 96, context 128×171 →
centre crop 112). Rates are clip frames delivered per second, one process (no DataLoader workers: the
per-core rate is what scales with workers). Implementations:

- ``pyav-decode``: ``decode_video(path, indices)`` only: the same decoding every loader does (the limit);
- ``torch-loader``: CAERVideoDataset + collate (decode → boxes → one face_context call per clip → batch);
- ``torch-batched``: the same decode, one face_context call per batch (issue 4 item 2's question);
- ``dali-cpu``: DALIVideoLoader(device="cpu");
- ``per-sample-pil``: the community way, PIL ops per frame (crop, black box, PIL resize, normalise).

Each one checks its batches against the torch loader's (same labels; pixels within decoder/resizer
tolerance), so a fast-but-wrong path fails.
"""

import numpy as np
import pytest
import torch

from caer_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from caer_fast.data import boxes as boxes_io
from caer_fast.data.datasets import NO_FACE, CAERVideoDataset, collate
from caer_fast.data.video import decode_video
from caer_fast.testing.media import write_clip

H, W, N_FRAMES, FPS, BATCH = 360, 640, 40, 25, 3
FILES = [("train/Anger/0000.webm", "libvpx-vp9"), ("train/Happy/0001.avi", "mjpeg"),
         ("train/Sad/0002.webm", "libvpx-vp9"), ("train/Fear/0003.avi", "mjpeg"),
         ("train/Surprise/0004.webm", "libvpx-vp9"), ("train/Neutral/0005.avi", "mjpeg")]
IMPLEMENTATIONS = ["pyav-decode", "torch-loader", "torch-batched", "dali-decode", "dali-cpu", "per-sample-pil"]


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data") / "CAER"
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rows = []
    for k, (rel, codec) in enumerate(FILES):
        frames = np.stack([np.stack([128 + 90 * np.sin(xx / 37 + t / 5 + k), 128 + 90 * np.cos(yy / 29 - t / 7),
                                     128 + 70 * np.sin((xx + yy) / 53 + t / 3)], -1)
                           for t in range(N_FRAMES)]).clip(0, 255).astype(np.uint8)
        opts = {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"} if codec == "libvpx-vp9" else {}
        write_clip(root / rel, frames, codec, FPS, options=opts)
        rows += [(rel, f, (250 + f, 60, 370 + f, 200), 0.9) for f in range(N_FRAMES) if f % 6]
    boxes_io.write_video_boxes(root / "train.faces.csv", rows)
    return root


def _dataset(root):
    return CAERVideoDataset(root, "train", train=False)  # centre crop, no jitter: outputs are checkable


def _per_sample_pil(ds, i, frames=None):
    """The community path: per frame, PIL crop/resize and a black box, then normalise (no fused op)."""
    from PIL import Image

    v, indices = ds.clips[i]
    if frames is None:
        frames = decode_video(ds.root / ds.videos[v][0], indices=indices).frames
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    (fh, fw), (ch, cw), c = ds.face_size, ds.context_size, ds.crop
    top, left = (ch - c) // 2, (cw - c) // 2
    faces, contexts = [], []
    for k, frame in zip(indices, frames):
        x1, y1, x2, y2 = ds._boxes[v].get(k, NO_FACE)
        img = Image.fromarray(frame)
        if x2 > x1:
            face = torch.from_numpy(np.array(img.crop((x1, y1, x2, y2)).resize((fw, fh), Image.BILINEAR)))
            faces.append((face.permute(2, 0, 1).float() / 255 - mean) / std)
            masked = frame.copy()
            masked[y1:y2, x1:x2] = 0
            img = Image.fromarray(masked)
        else:
            faces.append(torch.zeros(3, fh, fw))
        ctx = torch.from_numpy(np.array(img.resize((cw, ch), Image.BILINEAR)))
        contexts.append(((ctx.permute(2, 0, 1).float() / 255 - mean) / std)[:, top:top + c, left:left + c])
    return dict(face=torch.stack(faces, 1), context=torch.stack(contexts, 1), label=ds.videos[v][1], video=v)


def _batched_face_context(ds, ids):
    """Decode per clip, then ONE face_context call for the whole batch (frames of one size stacked)."""
    from caer_fast.ops import face_context

    frames, boxes = [], []
    for i in ids:
        v, indices = ds.clips[i]
        frames.append(torch.from_numpy(decode_video(ds.root / ds.videos[v][0], indices=indices).frames))
        boxes += [ds._boxes[v].get(k, NO_FACE) for k in indices]
    face, context = face_context(torch.cat(frames), torch.tensor(boxes).view(-1, 4), ds.face_size, ds.context_size,
                                 crop=ds._crop_window())
    n, t = len(ids), len(ds.clips[ids[0]][1])
    return dict(face=face.view(n, t, *face.shape[1:]).transpose(1, 2),
                context=context.view(n, t, *context.shape[1:]).transpose(1, 2),
                label=torch.tensor([ds.videos[ds.clips[i][0]][1] for i in ids]))


def _run(impl, ds):
    chunks = [list(range(len(ds)))[i:i + BATCH] for i in range(0, len(ds), BATCH)]
    if impl == "pyav-decode":
        return [[decode_video(ds.root / ds.videos[ds.clips[i][0]][0], indices=ds.clips[i][1]).frames for i in c]
                for c in chunks]
    if impl == "torch-loader":
        return list(torch.utils.data.DataLoader(ds, batch_size=BATCH, collate_fn=collate))
    if impl == "torch-batched":
        return [_batched_face_context(ds, c) for c in chunks]
    if impl == "dali-decode":  # DALI's CPU decoder alone (no face_context), the DALI loader's limit
        from caer_fast.data.dali_loader import _Source, clip_pipeline

        pipe = clip_pipeline(_Source(ds, chunks), batch_size=BATCH, num_threads=1, device_id=None)
        pipe.build()
        return [[np.array(t) for t in pipe.run()[0]] for _ in chunks]
    if impl == "dali-cpu":
        from caer_fast.data.dali_loader import DALIVideoLoader

        return list(DALIVideoLoader(ds, batch_size=BATCH, device="cpu", num_threads=1))
    if impl == "per-sample-pil":
        return [collate([_per_sample_pil(ds, i) for i in c]) for c in chunks]
    raise ValueError(impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_loader_frames_per_s(benchmark, bench_root, impl):
    if impl.startswith("dali"):
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    ds = _dataset(bench_root)
    n_frames = sum(len(ix) for _, ix in ds.clips)
    assert len(ds) == len(FILES) and n_frames == len(FILES) * 16
    torch.set_num_threads(1)
    benchmark.group = "video loading 360x640, 16-frame clips, frames/s"
    benchmark.extra_info.update(implementation=impl, frames=n_frames)
    out = benchmark.pedantic(_run, args=(impl, ds), rounds=7, iterations=1, warmup_rounds=2)
    benchmark.extra_info["frames_per_s"] = n_frames / benchmark.stats.stats.median

    ref = _run("torch-loader", ds)
    if impl in ("pyav-decode", "dali-decode"):
        assert [f.shape for c in out for f in c] == [(16, H, W, 3)] * len(FILES)
        return
    # per-sample PIL resizes with PIL's filters, DALI decodes with its own YUV→RGB: looser bounds there
    mean_tol, max_tol = {"per-sample-pil": (0.08, 2.0), "dali-cpu": (0.05, 0.6)}.get(impl, (1e-4, 1e-3))
    for a, b in zip(out, ref):
        assert a["label"].tolist() == b["label"].tolist()
        for key in ("face", "context"):
            assert a[key].shape == b[key].shape
            d = (a[key] - b[key]).abs()
            assert d.mean() <= mean_tol and d.max() <= max_tol, (impl, key, float(d.mean()), float(d.max()))


PROCESSING = ["face_context-per-clip", "face_context-per-batch", "per-sample-pil"]


@pytest.mark.parametrize("impl", PROCESSING)
def test_processing_frames_per_s(benchmark, bench_root, impl):
    """Decoded frames in memory → batch: what the fused op saves over per-frame PIL, decode excluded."""
    from caer_fast.ops import face_context

    ds = _dataset(bench_root)
    decoded = [decode_video(ds.root / ds.videos[v][0], indices=ix).frames for v, ix in ds.clips]
    torch.set_num_threads(1)

    def run():
        if impl == "per-sample-pil":
            return collate([_per_sample_pil(ds, i, decoded[i]) for i in range(len(ds))])
        boxes = [torch.tensor([ds._boxes[v].get(k, NO_FACE) for k in ix]) for v, ix in ds.clips]
        frames = [torch.from_numpy(f) for f in decoded]
        crop = ds._crop_window()
        if impl == "face_context-per-batch":
            f, c = face_context(torch.cat(frames), torch.cat(boxes), ds.face_size, ds.context_size, crop=crop)
            return dict(face=f.view(len(ds), 16, *f.shape[1:]).transpose(1, 2),
                        context=c.view(len(ds), 16, *c.shape[1:]).transpose(1, 2))
        out = [face_context(fr, b, ds.face_size, ds.context_size, crop=crop) for fr, b in zip(frames, boxes)]
        return dict(face=torch.stack([f.transpose(0, 1) for f, _ in out]),
                    context=torch.stack([c.transpose(0, 1) for _, c in out]))

    benchmark.group = "processing only (decoded 360x640 frames -> batch), frames/s"
    benchmark.extra_info.update(implementation=impl, frames=16 * len(ds))
    out = benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=2)
    benchmark.extra_info["frames_per_s"] = 16 * len(ds) / benchmark.stats.stats.median
    ref = collate([ds[i] for i in range(len(ds))])
    mean_tol, max_tol = (0.08, 2.0) if impl == "per-sample-pil" else (1e-4, 1e-3)
    for key in ("face", "context"):
        d = (out[key] - ref[key]).abs()
        assert out[key].shape == ref[key].shape and d.mean() <= mean_tol and d.max() <= max_tol, (impl, key)
