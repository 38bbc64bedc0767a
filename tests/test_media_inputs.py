"""Image inputs predict and serve must not get wrong: 16-bit PNGs (scaled, not clipped) and an image too large
to decode (refused as an image, never handed to the video decoder)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caer_fast.data.video import MediaDecodeError, MediaTooLargeError, read_image
from caer_fast.serving.inference import Predictor, is_image_file
from caer_fast.testing.serving import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def gray16_png(path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint16)).save(path, format="PNG")
    with Image.open(path) as im:  # the file really is 16-bit: PIL opens it in a 16/32-bit integer mode
        assert im.mode in ("I;16", "I")
    return Path(path)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.integers(0, 65536, (37, 53)).astype(np.uint16)
    img = read_image(gray16_png(tmp_path / "g16.png", v))
    assert img.shape == (37, 53, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[..., 0], np.rint(v * (255 / 65535)).astype(np.uint8))
    assert (img[..., 0] == img[..., 2]).all()
    assert img.max() > 250 and img.min() < 5 and 100 < img.mean() < 155  # not all white (the clipped result)


def test_16bit_photo_keeps_its_face(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    from caer_fast.data.detectors import HaarDetector, best_face

    gray8 = np.asarray(Image.fromarray(skdata.astronaut()).convert("L"))
    path = gray16_png(tmp_path / "astronaut16.png", gray8.astype(np.uint16) * 257)  # full 16-bit range
    img = read_image(path)
    assert np.abs(img[..., 0].astype(int) - gray8).max() <= 1
    assert best_face(HaarDetector().detect(img)) is not None  # clipped to white, the face was gone
    ck = make_checkpoint(tmp_path / "caers.pth", "caers")
    r = Predictor(ck, device="cpu").predict_file(path)
    assert r["face_found"] and r["kind"] == "image"


def test_huge_png_is_refused_as_an_image_not_decoded_as_video(tmp_path):
    big = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(big, format="PNG")  # 400 M pixels in a few dozen KB
    assert big.stat().st_size < 2_000_000
    assert is_image_file(big)  # PIL's bomb guard made this False, and the video decoder got the file
    with pytest.raises(MediaTooLargeError, match="image too large"):
        read_image(big)
    ck = make_checkpoint(tmp_path / "caers.pth", "caers")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "caer_fast.predict", str(big), "--checkpoint", str(ck)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "image too large" in proc.stderr and "20000×20000" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "video" not in proc.stderr


def test_a_cut_png_is_still_an_image_error(tmp_path):
    src = tmp_path / "ok.png"
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(src)
    cut = tmp_path / "cut.png"
    cut.write_bytes(src.read_bytes()[:60])
    assert is_image_file(cut)
    with pytest.raises(MediaDecodeError, match="not a readable image"):
        read_image(cut)
