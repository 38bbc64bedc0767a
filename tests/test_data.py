"""Datasets, box files and the synthetic demo data, on real encoded files."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from caer_fast.constants import CLASSES, IMAGENET_MEAN, IMAGENET_STD
from caer_fast.data import boxes as boxes_io
from caer_fast.data import synthetic
from caer_fast.data.datasets import (CAERSImageDataset, CAERVideoDataset, DatasetError, Skipped, clip_starts, collate,
                                     resample_indices)
from caer_fast.data.video import decode_video, probe_video, read_image
from caer_fast.ops import face_context
from conftest import DEMO_IMAGES, DEMO_SEED, DEMO_VIDEOS

SMALL = dict(face_size=(48, 48), context_size=(64, 86), crop=56)
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)


def demo_plan():
    return synthetic.plan(DEMO_SEED, DEMO_VIDEOS, DEMO_IMAGES)


def expected_clips(num_frames, fps, clip_frames, stride):
    n = len(resample_indices(num_frames, fps, 10.0))
    return 1 if n < clip_frames else (n - clip_frames) // stride + 1


# --- the synthetic data's design ---------------------------------------------------------------------

def test_label_needs_both_face_and_context():
    faces = {f for f, _ in synthetic.CLASS_CUES.values()}
    contexts = {c for _, c in synthetic.CLASS_CUES.values()}
    pairs = set(synthetic.CLASS_CUES.values())
    assert set(synthetic.CLASS_CUES) == set(CLASSES)
    assert len(faces) < 7 and len(contexts) < 7 and len(pairs) == 7
    # every class shares its face with some class and its context with some other class: neither
    # cue alone separates any pair that the other merges
    for name, (f, c) in synthetic.CLASS_CUES.items():
        same_face = {n for n, (f2, _) in synthetic.CLASS_CUES.items() if f2 == f} - {name}
        same_ctx = {n for n, (_, c2) in synthetic.CLASS_CUES.items() if c2 == c} - {name}
        assert not same_face & same_ctx
    assert synthetic.best_single_cue_accuracy(0) <= 4 / 7 + 1e-9
    assert synthetic.best_single_cue_accuracy(1) <= 4 / 7 + 1e-9


def test_plan_is_deterministic_and_seed_dependent():
    a, b, c = synthetic.plan(5, DEMO_VIDEOS, DEMO_IMAGES), synthetic.plan(5, DEMO_VIDEOS, DEMO_IMAGES), \
        synthetic.plan(6, DEMO_VIDEOS, DEMO_IMAGES)
    assert a == b
    assert [s.seed for _, s, _ in a["CAER"]["train"]] != [s.seed for _, s, _ in c["CAER"]["train"]]
    spec = a["CAER"]["train"][0][1]
    f1, b1 = synthetic.render_scene(spec)
    f2, b2 = synthetic.render_scene(spec)
    assert b1 == b2 and np.array_equal(f1, f2)
    assert [s.label for _, s, _ in a["CAER"]["train"]] == [CLASSES.index(r.split("/")[1]) for r, _, _ in
                                                           a["CAER"]["train"]]


def test_generation_is_byte_identical_for_the_same_seed(tmp_path):
    kw = dict(videos_per_class={"train": 1}, images_per_class={"train": 1}, frames=(6,), size=(64, 96))
    synthetic.make_demo_dataset(tmp_path / "a", seed=3, **kw)
    synthetic.make_demo_dataset(tmp_path / "b", seed=3, **kw)
    synthetic.make_demo_dataset(tmp_path / "c", seed=4, **kw)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b and len(a) == 7 * 2 + 3 + 2
    assert a != c


def test_generation_does_not_depend_on_earlier_encoders(tmp_path):
    """In the full suite this file runs after tests/test_dali.py, whose libx264 / libvpx encodes
    (default threads) left heap state that x264's AVX-512 MB-tree kernel read: the next demo
    encode came out different. Reproduce that order here: several such encodes between runs."""
    from caer_fast.testing.media import write_clip

    kw = dict(videos_per_class={"train": 1}, images_per_class={"train": 0}, frames=(6,), size=(64, 96))
    rng = np.random.default_rng(0)

    def run(name):
        root = tmp_path / name
        synthetic.make_demo_dataset(root, seed=3, **kw)
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*.avi"))}

    first = run("first")
    for k in range(3):
        write_clip(tmp_path / f"other{k}.mp4", rng.integers(0, 255, (20, 70, 94, 3), np.uint8), "libx264")
        write_clip(tmp_path / f"other{k}.webm", rng.integers(0, 255, (10, 58, 82, 3), np.uint8), "libvpx-vp9",
                   options={"deadline": "realtime", "cpu-used": "8"})
        assert run(f"again{k}") == first, k


def test_every_codec_decodes_to_the_expected_frames(demo_root):
    codecs = set()
    for split, rows in demo_plan()["CAER"].items():
        for rel, spec, codec in rows:
            info = probe_video(demo_root / "CAER" / rel)
            assert (info.num_frames, info.fps, info.height, info.width) == (spec.frames, spec.fps, 144, 192), rel
            assert probe_video(demo_root / "CAER" / rel, count_frames=False).num_frames == spec.frames
            codecs.add(info.codec)
    assert codecs == {"mjpeg", "mpeg4", "h264"}
    assert {s.fps for rows in demo_plan()["CAER"].values() for _, s, _ in rows} == {25, 30}


def test_box_files_hold_the_true_boxes(demo_root):
    for split, rows in demo_plan()["CAER"].items():
        table, bad = boxes_io.read_video_boxes(demo_root / "CAER" / f"{split}.faces.csv")
        assert not bad
        for rel, spec, _ in rows[:4]:
            _, true = synthetic.render_scene(spec)
            assert [table[rel][k][0] for k in range(spec.frames)] == true
    table, bad = boxes_io.read_image_boxes(demo_root / "CAER-S" / "train.txt")
    assert not bad and len(table) == 7 * DEMO_IMAGES["train"]


# --- box files ---------------------------------------------------------------------------------------

def test_box_files_round_trip(tmp_path):
    vrows = [("train/Anger/0000.avi", 0, (1, 2, 30, 40), 0.9), ("train/Anger/0000.avi", 3, (5, 6, 7, 8), 1.0)]
    boxes_io.write_video_boxes(tmp_path / "v.csv", vrows)
    table, bad = boxes_io.read_video_boxes(tmp_path / "v.csv")
    assert not bad and table == {"train/Anger/0000.avi": {0: ((1, 2, 30, 40), 0.9), 3: ((5, 6, 7, 8), 1.0)}}
    irows = [("Happy/0001.png", 3, (10, 20, 30, 40))]
    boxes_io.write_image_boxes(tmp_path / "i.txt", irows)
    table, bad = boxes_io.read_image_boxes(tmp_path / "i.txt")
    assert not bad and table == {"Happy/0001.png": (3, (10, 20, 30, 40))}


# --- clip sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,native,expected", [
    (24, 25.0, [0, 2, 5, 7, 10, 12, 15, 17, 20, 22]),
    (10, 30.0, [0, 3, 6, 9]),
    (7, 10.0, list(range(7))),
    (4, 5.0, list(range(4))),  # slower than 10 fps: every frame
])
def test_resample_indices(n, native, expected):
    assert resample_indices(n, native, 10.0) == expected


def test_clip_starts():
    assert clip_starts(32, 16, 16) == [0, 16]
    assert clip_starts(33, 16, 8) == [0, 8, 16]
    assert clip_starts(5, 16, 8) == [0]
    assert clip_starts(0, 16, 8) == []


def test_demo_clip_counts_train_and_test(demo_root):
    rows = demo_plan()["CAER"]["train"]
    for train, stride in ((True, 8), (False, 4)):
        ds = CAERVideoDataset(demo_root / "CAER", "train", train=train, clip_frames=8, test_stride=4, **SMALL)
        assert [r for r, _ in ds.videos] == sorted(r for r, _, _ in rows)
        assert ds.bad_files == []
        by_rel = {r: s for r, s, _ in rows}
        per_video = np.bincount([v for v, _ in ds.clips], minlength=len(ds.videos))
        for v, (rel, label) in enumerate(ds.videos):
            spec = by_rel[rel]
            assert label == spec.label == CLASSES.index(rel.split("/")[1])
            assert per_video[v] == expected_clips(spec.frames, spec.fps, 8, stride), (rel, train)
        assert len(ds) == len(ds.clips) == per_video.sum()
        assert all(len(idx) == 8 for _, idx in ds.clips)
        clips0 = [idx for v, idx in ds.clips if v == 0]
        if train:  # non-overlapping clips; test clips overlap by clip_frames - stride
            assert all(set(a).isdisjoint(b) for a, b in zip(clips0, clips0[1:]))
        else:
            assert all(len(set(a) & set(b)) == 4 for a, b in zip(clips0, clips0[1:]))


# --- decoded content ---------------------------------------------------------------------------------

def _counter_video(root, frames=50, fps=30, codec="mjpeg", name="train/Happy/0000.avi", size=(48, 64)):
    """A video whose frame k is uniformly grey level 4·k + 20: the decoded level names the frame."""
    levels = 4 * np.arange(frames) + 20
    arr = np.broadcast_to(levels[:, None, None, None], (frames, *size, 3)).astype(np.uint8).copy()
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.encode_video(path, arr, fps, codec)
    boxes_io.write_video_boxes(Path(root) / "train.faces.csv", [])  # header only: no faces, no warning
    return path


def _level(ctx):  # 3×T×H×W normalised → mean grey level (0..255) of each frame
    return ((ctx * STD + MEAN) * 255).mean(dim=(0, 2, 3))


@pytest.mark.parametrize("codec", ["mjpeg", "mpeg4", "libx264"])
def test_clips_decode_the_resampled_frames(tmp_path, codec):
    _counter_video(tmp_path, frames=50, fps=30, codec=codec)
    ds = CAERVideoDataset(tmp_path, "train", train=False, clip_frames=4, test_stride=2, face_size=(8, 8),
                          context_size=(48, 64), crop=None)
    # 50 frames at 30 fps → every 3rd frame → 17 frames → clips of 4 every 2
    assert ds.clips[0] == (0, (0, 3, 6, 9)) and ds.clips[1] == (0, (6, 9, 12, 15))
    assert len(ds) == (17 - 4) // 2 + 1
    for i in (0, len(ds) - 1):
        _, idx = ds.clips[i]
        got = _level(ds[i]["context"])
        assert torch.allclose(got, 4 * torch.tensor(idx, dtype=torch.float32) + 20, atol=2.5), (idx, got)


def test_short_video_is_one_clip_padded_with_its_last_frame(tmp_path):
    _counter_video(tmp_path, frames=5, fps=10)
    ds = CAERVideoDataset(tmp_path, "train", train=True, clip_frames=8, face_size=(8, 8),
                          context_size=(48, 64), crop=None, flip_p=0.0, color_jitter=False)
    assert ds.clips == [(0, (0, 1, 2, 3, 4, 4, 4, 4))]
    levels = _level(ds[0]["context"])
    assert torch.allclose(levels, torch.tensor([20, 24, 28, 32, 36, 36, 36, 36.0]), atol=2.5)


def test_face_crop_is_the_drawn_face(demo_root):
    """Dataset face/context = face_context on the re-rendered frames with the true boxes; a shifted box is not."""
    ds = CAERVideoDataset(demo_root / "CAER", "test", train=False, clip_frames=8, test_stride=4,
                          face_size=(48, 48), context_size=(144, 192), crop=None)
    specs = {r: s for r, s, _ in demo_plan()["CAER"]["test"]}
    for i in (0, len(ds) // 2, len(ds) - 1):
        v, idx = ds.clips[i]
        rel, label = ds.videos[v]
        sample = ds[i]
        assert sample["label"] == label and sample["video"] == v
        assert sample["face"].shape == (3, 8, 48, 48) and sample["context"].shape == (3, 8, 144, 192)
        frames, true = synthetic.render_scene(specs[rel])
        rendered = torch.from_numpy(frames[list(idx)])
        box = torch.tensor([true[k] for k in idx])
        want, _ = face_context(rendered, box, (48, 48), (144, 192))
        err = (sample["face"] - want.transpose(0, 1)).abs().mean()
        shifted, _ = face_context(rendered, box + torch.tensor([14, 10, 14, 10]), (48, 48), (144, 192))
        err_shifted = (sample["face"] - shifted.transpose(0, 1)).abs().mean()
        assert err < 0.2 and err_shifted > 2 * err, (rel, float(err), float(err_shifted))
        # the face box is painted black in the context (context size = frame size: no resampling)
        x1, y1, x2, y2 = true[idx[0]]
        black = (-MEAN / STD)[:, 0]
        assert torch.allclose(sample["context"][:, 0, y1:y2, x1:x2], black.expand(3, y2 - y1, x2 - x1), atol=1e-5)
        assert not torch.allclose(sample["context"][:, 0, y1:y2, x2:x2 + 4], black.expand(3, y2 - y1, 4), atol=0.1)


def test_missing_box_means_no_face(tmp_path, demo_root):
    split = tmp_path / "test" / "Happy"
    split.mkdir(parents=True)
    rel_src = next(r for r, s, _ in demo_plan()["CAER"]["test"] if s.label == CLASSES.index("Happy"))
    shutil.copy(demo_root / "CAER" / rel_src, split / "0000.avi")
    table, _ = boxes_io.read_video_boxes(demo_root / "CAER" / "test.faces.csv")
    # boxes for even frames only
    boxes_io.write_video_boxes(tmp_path / "test.faces.csv",
                               [("test/Happy/0000.avi", k, b, s) for k, (b, s) in table[rel_src].items() if k % 2 == 0])
    ds = CAERVideoDataset(tmp_path, "test", train=False, clip_frames=8, face_size=(16, 16),
                          context_size=(144, 192), crop=None)
    _, idx = ds.clips[0]
    s = ds[0]
    for t, k in enumerate(idx):
        no_face = bool((s["face"][:, t] == 0).all())
        assert no_face == (k % 2 == 1), (t, k)
    # an odd frame: its drawn face is not masked in the context
    t = next(t for t, k in enumerate(idx) if k % 2 == 1)
    x1, y1, x2, y2 = table[rel_src][idx[t]][0]
    assert s["context"][:, t, y1:y2, x1:x2].abs().amax() > 0.5


def test_train_mode_same_crop_and_flip_for_every_frame(demo_root):
    kw = dict(clip_frames=8, face_size=(48, 48), context_size=(64, 86))
    full = CAERVideoDataset(demo_root / "CAER", "validation", train=False, crop=None, **kw)
    aug = CAERVideoDataset(demo_root / "CAER", "validation", train=True, crop=56, flip_p=1.0, color_jitter=False, **kw)
    i = next(i for i, (v, idx) in enumerate(aug.clips) if (v, idx) in full.clips)
    ref = full[full.clips.index(aug.clips[i])]
    torch.manual_seed(0)
    tops_lefts = set()
    for _ in range(3):
        s = aug[i]
        assert torch.equal(s["face"], ref["face"].flip(-1))
        ctx = s["context"].flip(-1)  # undo the flip, then find the crop window of frame 0
        hits = [(t, l) for t in range(64 - 56 + 1) for l in range(86 - 56 + 1)
                if torch.allclose(ctx[:, 0], ref["context"][:, 0, t:t + 56, l:l + 56], atol=1e-5)]
        assert len(hits) >= 1
        t, l = hits[0]
        assert torch.allclose(ctx, ref["context"][:, :, t:t + 56, l:l + 56], atol=1e-5)  # same window, all frames
        tops_lefts.add((t, l))
    assert len(tops_lefts) > 1  # and the window is random


def test_color_jitter_changes_pixels_but_keeps_shapes(demo_root):
    torch.manual_seed(1)
    ds = CAERVideoDataset(demo_root / "CAER", "validation", train=True, clip_frames=8, flip_p=0.0, crop=None,
                          face_size=(48, 48), context_size=(64, 86))
    plain = CAERVideoDataset(demo_root / "CAER", "validation", train=True, clip_frames=8, flip_p=0.0,
                             crop=None, face_size=(48, 48), context_size=(64, 86), color_jitter=False)
    a, b = ds[0], plain[0]
    assert a["face"].shape == b["face"].shape and a["context"].shape == b["context"].shape
    assert torch.isfinite(a["context"]).all() and not torch.allclose(a["context"], b["context"])
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert ((a["context"] >= lo - 1e-5) & (a["context"] <= hi + 1e-5)).all()


# --- CAER-S ------------------------------------------------------------------------------------------

def test_image_dataset_reads_pixels_and_boxes_exactly(demo_root):
    root = demo_root / "CAER-S"
    ds = CAERSImageDataset(root, "train", train=False, **SMALL)
    rows = demo_plan()["CAER-S"]["train"]
    assert len(ds) == len(ds.videos) == len(rows) and ds.bad_files == []
    assert [r for r, _ in ds.videos] == sorted(f"train/{r}" for r, _ in rows)
    specs = {f"train/{r}": s for r, s in rows}
    for i in (0, 5, len(ds) - 1):
        rel, label = ds.videos[i]
        frames, true = synthetic.render_scene(specs[rel])
        img = read_image(root / rel)
        assert np.array_equal(img, frames[0])  # PNG is lossless
        s = ds[i]
        assert s["label"] == label == specs[rel].label and s["video"] == i
        face, ctx = face_context(torch.from_numpy(frames[:1].copy()), torch.tensor([true[0]]), (48, 48), (64, 86),
                                 crop=(4, 15, 56, 56))
        assert torch.equal(s["face"], face[0]) and torch.equal(s["context"], ctx[0])


def test_image_box_paths_may_carry_the_split_prefix(tmp_path, demo_root):
    root = tmp_path / "CAER-S"
    shutil.copytree(demo_root / "CAER-S" / "test", root / "test")
    table, _ = boxes_io.read_image_boxes(demo_root / "CAER-S" / "test.txt")
    boxes_io.write_image_boxes(root / "test.txt", [(f"test/{p}", lab, b) for p, (lab, b) in table.items()])
    ds = CAERSImageDataset(root, "test", train=False, **SMALL)
    assert all((ds[i]["face"] != 0).any() for i in range(len(ds)))


# --- bad inputs --------------------------------------------------------------------------------------

def _small_copy(demo_root, tmp_path, n=3):
    """A CAER tree with the first ``n`` test videos of the demo and their boxes."""
    root = tmp_path / "CAER"
    rows = demo_plan()["CAER"]["test"][:n]
    for rel, _, _ in rows:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_root / "CAER" / rel, root / rel)
    shutil.copy(demo_root / "CAER" / "test.faces.csv", root / "test.faces.csv")
    for c in CLASSES:  # all emotion folders (most empty): strict datasets refuse a tree missing some
        (root / "test" / c).mkdir(exist_ok=True)
    return root, [r for r, _, _ in rows]


def test_file_that_breaks_after_indexing_is_skipped_and_named(demo_root, tmp_path):
    root, rels = _small_copy(demo_root, tmp_path)
    ds = CAERVideoDataset(root, "test", train=False, clip_frames=8, **SMALL)
    strict = CAERVideoDataset(root, "test", train=False, clip_frames=8, strict=True, **SMALL)
    broken = root / ds.videos[1][0]
    broken.write_bytes(b"")
    j = next(i for i, (v, _) in enumerate(ds.clips) if v == 1)
    assert isinstance(ds[j], Skipped) and ds[j].path == str(broken)
    assert ds.failures and ds.failures[0][0] == str(broken) and "empty" in ds.failures[0][1]
    out = collate([ds[0], ds[j], ds[len(ds) - 1]])
    assert out["skipped"] == 1 and out["face"].shape[0] == 2 and out["label"].dtype == torch.long
    assert len(out["skipped_items"]) == 1 and str(broken) in out["skipped_items"][0]
    with pytest.raises(DatasetError, match=str(broken.name)):
        strict[j]
    # garbage bytes instead of a video
    broken.write_bytes(b"RIFF not really an avi" * 50)
    assert isinstance(ds[j], Skipped) and ds.failures[-1][0] == str(broken) and "not a readable" in ds.failures[-1][1]
    # all failed: the batch has nothing to stack
    out = collate([Skipped("a", "x"), None])
    assert out["skipped"] == 2 and out["face"] is None and out["label"].numel() == 0


def test_unreadable_files_and_bad_box_lines_found_at_index_time(demo_root, tmp_path):
    root, rels = _small_copy(demo_root, tmp_path)
    (root / rels[0]).write_bytes(b"")
    (root / "test" / "Bored").mkdir()  # not an emotion class
    shutil.copy(root / rels[1], root / "test" / "Bored" / "x.avi")
    with open(root / "test.faces.csv", "a") as f:
        f.write("test/Anger/0000.avi,1,10,10,5,5,1.0\n")  # empty box
        f.write("test/Anger/0000.avi,oops\n")
    with pytest.warns(UserWarning, match="Bored"):
        ds = CAERVideoDataset(root, "test", train=False, clip_frames=8, **SMALL)
    assert [r for r, _ in ds.videos] == rels[1:]
    reasons = dict(ds.bad_files)
    assert "empty" in reasons[str(root / rels[0])]
    assert sum("test.faces.csv" in p for p, _ in ds.bad_files) == 2
    with pytest.raises(DatasetError, match="extra folder Bored"):  # strict: a folder that is not a class too
        CAERVideoDataset(root, "test", train=False, clip_frames=8, strict=True, **SMALL)
    shutil.rmtree(root / "test" / "Bored")
    with pytest.raises(DatasetError, match="test.faces.csv|0000.avi"):
        CAERVideoDataset(root, "test", train=False, clip_frames=8, strict=True, **SMALL)


def test_missing_split_and_missing_box_file(tmp_path, demo_root):
    with pytest.raises(DatasetError, match="nope"):
        CAERVideoDataset(tmp_path / "nope", "train", train=True)
    root, _ = _small_copy(demo_root, tmp_path, n=1)
    with pytest.raises(DatasetError, match="missing.csv"):
        CAERVideoDataset(root, "test", train=False, boxes_file=root / "missing.csv")
    (root / "test.faces.csv").unlink()
    with pytest.warns(UserWarning, match="no face-box file"):
        ds = CAERVideoDataset(root, "test", train=False, clip_frames=8, **SMALL)
    assert (ds[0]["face"] == 0).all()


def test_dataloader_with_collate(demo_root):
    ds = CAERSImageDataset(demo_root / "CAER-S", "test", train=True, **SMALL)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["face"].shape == (4, 3, 48, 48) and batch["context"].shape == (4, 3, 56, 56)
    assert batch["face"].dtype == torch.float32 and batch["skipped"] == 0


def test_cli_writes_a_tree(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--videos-per-class", "1", "--images-per-class", "1",
                           "--size", "64x96", "--seed", "1", "--frames", "10,12", "--no-progress"]) == 0
    assert "wrote 21 videos" in capsys.readouterr().out
    assert len(list((tmp_path / "CAER" / "validation").rglob("*.avi"))) == 7
    ds = CAERVideoDataset(tmp_path / "CAER", "train", train=False, clip_frames=8, face_size=(16, 16),
                          context_size=(32, 48), crop=32)
    assert len(ds.videos) == 7 and ds[0]["context"].shape == (3, 8, 32, 32)
    for bad in (["--size", "65x96"], ["--frames", "0"], ["--size", "big"]):
        with pytest.raises(SystemExit):
            synthetic.main(["--out", str(tmp_path / "x"), *bad])


def test_index_cache_skips_probing_unchanged_videos(tmp_path, monkeypatch):
    """Second index of a split reads frame counts back; a rewritten file is probed again; a corrupt one
    is reported on every run and never cached."""
    from caer_fast.data import datasets as datasets_mod

    monkeypatch.setenv("CAER_FAST_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "CAER"
    _counter_video(root, frames=30, fps=10, name="train/Happy/0000.avi")
    _counter_video(root, frames=20, fps=10, name="train/Sad/0001.avi")
    (root / "train" / "Fear").mkdir()
    (root / "train" / "Fear" / "junk.avi").write_bytes(b"not a video at all")
    probed = []
    real_probe = datasets_mod.probe_video
    monkeypatch.setattr(datasets_mod, "probe_video", lambda p, **kw: probed.append(Path(p).name) or real_probe(p, **kw))
    kw = dict(train=False, clip_frames=4, test_stride=4, face_size=(8, 8), context_size=(16, 16), crop=None)

    first = CAERVideoDataset(root, "train", **kw)
    assert sorted(probed) == ["0000.avi", "0001.avi", "junk.avi"] and len(first.bad_files) == 1
    probed.clear()
    second = CAERVideoDataset(root, "train", **kw)
    assert probed == ["junk.avi"]  # the two good videos came from the cache
    assert second.clips == first.clips and second.num_frames == first.num_frames == [30, 20]
    assert second.codecs == first.codecs and len(second.bad_files) == 1

    _counter_video(root, frames=12, fps=10, name="train/Sad/0001.avi")  # same name, new content
    probed.clear()
    third = CAERVideoDataset(root, "train", **kw)
    assert sorted(probed) == ["0001.avi", "junk.avi"] and third.num_frames == [30, 12]
    probed.clear()
    CAERVideoDataset(root, "train", index_cache=False, **kw)
    assert sorted(probed) == ["0000.avi", "0001.avi", "junk.avi"]


def test_index_cache_that_cannot_be_written_only_warns(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("CAER_FAST_CACHE_DIR", str(blocker))
    _counter_video(tmp_path, frames=10, fps=10)
    with caplog.at_level("WARNING", logger="caer_fast.data.index_cache"):
        ds = CAERVideoDataset(tmp_path, "train", train=False, clip_frames=4, face_size=(8, 8),
                              context_size=(16, 16), crop=None)
    assert ds.num_frames == [10]
    assert "could not write the index cache" in caplog.text
