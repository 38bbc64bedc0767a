"""Checkpoint writes under a full disk, and property tests of the box-file parsers."""
import subprocess
import sys
import textwrap

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caer_fast.data import boxes as boxes_io
from caer_fast.models import CAERSNet


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    import caer_fast

    path = tmp_path / "checkpoint.pth"
    good = {"model": CAERSNet().state_dict(), "epoch": 4}
    caer_fast.save_checkpoint(good, path)
    before = path.read_bytes()
    # A child process whose file-size limit is 1 MiB: writing the ~10 MB checkpoint fails with EFBIG,
    # as a write on a full disk fails with ENOSPC.
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        import caer_fast
        from caer_fast.models import CAERSNet
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            caer_fast.save_checkpoint({{"model": CAERSNet().state_dict(), "epoch": 5}}, {str(path)!r})
        except caer_fast.CheckpointError as exc:
            print("CheckpointError", exc)
            sys.exit(0)
        sys.exit("the write did not fail")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CheckpointError") and "could not write" in proc.stdout
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["epoch"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temp file left behind


box = st.tuples(st.integers(-5000, 5000), st.integers(-5000, 5000), st.integers(-5000, 5000),
                st.integers(-5000, 5000))
path_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), min_size=1,
                    max_size=30).filter(lambda s: s.strip() == s and s)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(path_text, st.integers(0, 6), box), max_size=12))
def test_image_boxes_round_trip(rows):
    valid = {p: (label, b) for p, label, b in rows if b[2] > b[0] and b[3] > b[1]}
    text = boxes_io.format_image_boxes((p, label, b) for p, label, b in rows)
    parsed, bad = boxes_io.parse_image_boxes(text, "x.txt")
    assert parsed == valid
    assert len(bad) == sum(1 for _, _, b in rows if not (b[2] > b[0] and b[3] > b[1]))
    assert all(b.file == "x.txt" and b.line >= 1 and b.reason for b in bad)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(path_text, st.integers(0, 10_000), box,
                          st.floats(0, 1, allow_nan=False)), max_size=12))
def test_video_boxes_round_trip(rows):
    expected = {}
    for p, frame, b, score in rows:
        if b[2] > b[0] and b[3] > b[1]:
            expected.setdefault(p, {})[frame] = (b, round(score, 4))
    parsed, bad = boxes_io.parse_video_boxes(boxes_io.format_video_boxes(rows), "s.faces.csv")
    got = {p: {f: (b, round(s, 4)) for f, (b, s) in frames.items()} for p, frames in parsed.items()}
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_parsers_never_raise_on_garbage(text):
    for parse in (boxes_io.parse_image_boxes, boxes_io.parse_video_boxes):
        parsed, bad = parse(text, "junk.csv")
        assert isinstance(parsed, dict) and all(b.file == "junk.csv" for b in bad)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5000), st.floats(1.0, 120.0), st.sampled_from([5.0, 10.0, 15.0]))
def test_resampled_indices_are_valid_and_evenly_spread(num_frames, native_fps, fps):
    from caer_fast.data.datasets import resample_indices

    idx = resample_indices(num_frames, native_fps, fps)
    assert all(0 <= i < num_frames for i in idx)
    assert idx == sorted(set(idx))  # strictly increasing: no frame twice
    if num_frames:
        assert idx[0] == 0
        expected = num_frames if native_fps <= fps else num_frames * fps / native_fps
        assert abs(len(idx) - expected) <= 1
        if native_fps > fps and len(idx) > 1:
            gaps = {b - a for a, b in zip(idx, idx[1:])}
            assert max(gaps) - min(gaps) <= 1  # even spacing, up to rounding


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.integers(1, 32), st.integers(1, 32))
def test_clip_starts_cover_the_video_without_running_off_it(length, clip_frames, stride):
    from caer_fast.data.datasets import clip_starts

    starts = clip_starts(length, clip_frames, stride)
    if length == 0:
        assert starts == []
    elif length < clip_frames:
        assert starts == [0]  # one padded clip
    else:
        assert starts[0] == 0 and all(s + clip_frames <= length for s in starts)
        assert all(b - a == stride for a, b in zip(starts, starts[1:]))
        assert starts[-1] + stride + clip_frames > length  # no further clip fits
