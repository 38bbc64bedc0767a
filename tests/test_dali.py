"""DALI loader (CPU decoders) on real VP8/VP9/MJPEG files, checked against PyAV and CAERVideoDataset.

Tolerance: DALI and PyAV (swscale) convert YUV→RGB differently, so frames differ by a few uint8
levels: measured mean |Δ| ≈ 1.6, max 7-8 for VP8/VP9 and up to 22 for MJPEG (chroma upsampling at
8×8 block edges). We allow mean ≤ 2.5 levels, max ≤ 10 (VP8/VP9) / 28 (MJPEG); after face_context
that is mean ≤ 0.05 and max ≤ 0.5 in normalised units (1 level ≈ 0.017).
The GPU (NVDEC, ``device="cuda"``) path needs a GPU and is not exercised here.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

from caer_fast.data import boxes as boxes_io  # noqa: E402
from caer_fast.data.dali_loader import DALIVideoLoader, UnsupportedCodecError, clip_pipeline  # noqa: E402
from caer_fast.data.datasets import CAERVideoDataset, collate  # noqa: E402
from caer_fast.data.video import decode_video  # noqa: E402
from caer_fast.testing.media import write_clip  # noqa: E402

SMALL = dict(face_size=(24, 24), context_size=(32, 43), crop=28, clip_frames=8)
# (relative path, PyAV encoder, pix_fmt, options, H, W, frames, fps); odd sizes on purpose
CLIPS = [
    ("train/Anger/0000.webm", "libvpx-vp9", "yuv420p", {"crf": "4", "b": "0", "deadline": "realtime",
                                                         "cpu-used": "8"}, 70, 94, 30, 25),
    ("train/Happy/0001.avi", "mjpeg", "yuvj420p", {}, 70, 94, 40, 30),
    ("train/Sad/0002.mkv", "libvpx", "yuv420p", {"crf": "4", "b": "1M"}, 58, 82, 12, 25),  # short: padded clip
    ("train/Surprise/0003.webm", "libvpx-vp9", "yuv420p", {"crf": "4", "b": "0", "deadline": "realtime",
                                                            "cpu-used": "8"}, 70, 94, 45, 25),
]
MAX_DIFF = {"libvpx-vp9": 10, "libvpx": 10, "mjpeg": 28}


def _scene(t_count, h, w, seed):
    """Smooth moving colour waves (sharp colour edges would test chroma upsampling, not decoding)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = [np.stack([128 + 80 * np.sin(xx / 17 + t / 5 + seed), 128 + 80 * np.cos(yy / 13 - t / 7 + seed),
                     128 + 60 * np.sin((xx + yy) / 23 + t / 3)], -1) for t in range(t_count)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def caer_tree(tmp_path_factory):
    """A CAER tree of VP9/VP8/MJPEG clips with a face box on most frames; yields (root, {rel: frames})."""
    root = tmp_path_factory.mktemp("dali") / "CAER"
    truth, rows = {}, []
    for k, (rel, codec, pix, opts, h, w, n, fps) in enumerate(CLIPS):
        frames = _scene(n, h, w, k)
        write_clip(root / rel, frames, codec, fps, pix, opts)
        truth[rel] = frames
        for f in range(n):
            if f % 5 != 3:  # every fifth frame has no face
                rows.append((rel, f, (10 + f % 7, 8, 40 + f % 5, 50), 0.9))
    boxes_io.write_video_boxes(root / "train.faces.csv", rows)
    return root, truth


def _dataset(root, train=False):
    return CAERVideoDataset(root, "train", train=train, test_stride=4, **SMALL)


@pytest.mark.parametrize("k", range(3), ids=[c[1] for c in CLIPS[:3]])
def test_cpu_decoder_frames_match_pyav_and_source(caer_tree, k):
    root, truth = caer_tree
    rel, codec = CLIPS[k][0], CLIPS[k][1]
    ds = _dataset(root)
    v = [r for r, _ in ds.videos].index(rel)
    indices = [ix for vv, ix in ds.clips if vv == v][-1]  # 10 fps decode-order indices, maybe padded
    pipe = clip_pipeline([([np.fromfile(root / rel, np.uint8)], [np.asarray(indices, np.int32)], [np.zeros(1, np.int64)])],
                         batch_size=1, num_threads=1, device_id=None)
    pipe.build()
    got = np.asarray(pipe.run()[0][0]).astype(int)
    ref = decode_video(root / rel, indices=indices).frames.astype(int)
    assert got.shape == ref.shape == (len(indices),) + truth[rel].shape[1:]
    diff = np.abs(got - ref)
    assert diff.mean() <= 2.5 and diff.max() <= MAX_DIFF[codec], (diff.mean(), diff.max())
    # and the frames are the ones written (right indices, not neighbours): close to the source
    src = truth[rel][list(indices)].astype(int)
    assert np.abs(got - src).mean() <= 4.5
    shifted = truth[rel][[min(i + 1, len(truth[rel]) - 1) for i in indices]].astype(int)
    assert np.abs(got - src).mean() < 0.5 * np.abs(got - shifted).mean()


def _close(a, b, what):
    d = (a - b).abs()
    assert d.mean() <= 0.05 and d.max() <= 0.5, f"{what}: mean {d.mean():.4f}, max {d.max():.4f}"


def test_loader_batches_match_the_torch_dataset(caer_tree):
    root, _ = caer_tree
    ds = _dataset(root)
    assert len(ds) % 3 != 0  # the last batch is partial
    dali = list(DALIVideoLoader(ds, batch_size=3, num_threads=1))
    ref = list(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate))
    assert len(dali) == len(ref) == -(-len(ds) // 3)
    for a, b in zip(dali, ref):
        assert set(a) == set(b)
        assert a["label"].tolist() == b["label"].tolist() and a["video"].tolist() == b["video"].tolist()
        assert a["face"].shape == b["face"].shape and a["context"].shape == b["context"].shape
        assert a["skipped"] == 0 and a["skipped_items"] == []
        _close(a["face"], b["face"], "face")
        _close(a["context"], b["context"], "context")
    # no-face frames are exactly zero in both
    assert torch.equal(torch.cat([a["face"] for a in dali]).abs().sum((1, 3, 4)) == 0,
                       torch.cat([b["face"] for b in ref]).abs().sum((1, 3, 4)) == 0)


def test_training_mode_same_augmentation_as_the_torch_loader(caer_tree):
    root, _ = caer_tree
    ds = _dataset(root, train=True)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1)).tolist()
    torch.manual_seed(7)
    dali = list(DALIVideoLoader(ds, batch_size=4, sampler=order, drop_last=True, num_threads=1))
    torch.manual_seed(7)
    # a generator of its own, so DataLoader's base-seed draw leaves the global RNG to the augmentation
    ref = list(torch.utils.data.DataLoader(ds, batch_size=4, sampler=order, drop_last=True, collate_fn=collate,
                                           generator=torch.Generator()))
    assert len(dali) == len(ref) == len(ds) // 4 >= 1
    for a, b in zip(dali, ref):
        assert a["video"].tolist() == b["video"].tolist()
        _close(a["face"], b["face"], "face")  # same crop, flip and jitter draws → same tensors
        _close(a["context"], b["context"], "context")


def test_h264_and_mpeg4_files_give_a_clear_codec_error(caer_tree, tmp_path):
    import shutil

    root = tmp_path / "CAER"
    shutil.copytree(caer_tree[0], root)
    frames = _scene(20, 70, 94, 9)
    write_clip(root / "train/Fear/0009.mp4", frames, "libx264", 25)
    write_clip(root / "train/Fear/0010.avi", frames, "mpeg4", 25)
    ds = _dataset(root)
    with pytest.raises(UnsupportedCodecError) as err:
        DALIVideoLoader(ds, batch_size=4)
    msg = str(err.value)
    assert "0009.mp4" in msg and "h264" in msg and "0010.avi" in msg and "mpeg4" in msg
    assert "GPU" in msg and "--loader torch" in msg and "2 of 6 videos" in msg
    # skip mode: their clips are dropped and named in the batches, the rest decodes
    with pytest.warns(UserWarning, match="0009.mp4"):
        loader = DALIVideoLoader(ds, batch_size=4, unsupported="skip", num_threads=1)
    batches = list(loader)
    bad = {v for v, (rel, _) in enumerate(ds.videos) if rel.endswith(("0009.mp4", "0010.avi"))}
    n_bad = sum(1 for v, _ in ds.clips if v in bad)
    assert sum(b["skipped"] for b in batches) == n_bad > 0
    assert sum(len(b["label"]) for b in batches) == len(ds) - n_bad
    items = [s for b in batches for s in b["skipped_items"]]
    assert any("0009.mp4: codec h264 needs a GPU" in s for s in items)


def _train(*args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "caer_fast.train", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_train_cli_with_loader_dali(caer_tree, tmp_path):
    import shutil

    root = tmp_path / "CAER"
    shutil.copytree(caer_tree[0], root)
    shutil.copytree(root / "train", root / "test")  # tiny tree: test = train
    (root / "test.faces.csv").write_bytes((root / "train.faces.csv").read_bytes())
    common = ["--data", root, "--loader", "dali", "--device", "cpu", "--epochs", "1", "-b", "2", "--no-progress",
              "--clip-frames", "8", "--face-size", "16", "--context-size", "24x32", "--crop", "20", "-j", "1"]
    proc = _train(*common, "--output-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test: clip top-1" in proc.stdout and (tmp_path / "run" / "checkpoint.pth").is_file()
    assert "skipped" not in proc.stdout
    # CAER-S images are not videos
    proc = _train("--data", root, "--loader", "dali", "--model", "caers", "--output-dir", tmp_path / "r2")
    assert proc.returncode != 0 and "--loader torch" in proc.stderr
