"""Record (or compare) the Predictor's answers on fixed inputs: demo videos, odd-length videos, images,
in-memory frames, both models, detector and known boxes. Used to check a refactor of serving/ keeps the
answers to 1e-5.

    python tools/baseline_answers.py record OUT.json   # the code before the change
    python tools/baseline_answers.py compare OUT.json  # the code after

Answers differ across CPUs by up to 4e-5 (the checkpoints are trained a few steps here, with each CPU's
kernels), so compare with a file recorded on the same kind of CPU: baseline_answers_2408dd5.json was recorded
on an Intel Xeon (AVX-512), baseline_answers_2408dd5_avx2.json on an AMD EPYC (AVX2 + FMA). At 2408dd5 the
helpers lived in tests/serving_helpers.py: record there with this file's last import changed to
``from serving_helpers import ...`` and ``PYTHONPATH=tests``.
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from caer_fast.data.synthetic import make_demo_dataset
from caer_fast.predict import boxes_for
from caer_fast.serving.inference import Predictor
from caer_fast.testing.serving import make_checkpoint, write_png, write_video


def answers() -> dict:
    torch.set_num_threads(1)
    d = Path(tempfile.mkdtemp(prefix="baseline_"))
    demo = d / "demo"
    make_demo_dataset(demo, seed=0, videos_per_class={"train": 0, "validation": 0, "test": 1},
                      images_per_class={"train": 0, "test": 1})
    ck = {m: make_checkpoint(d / f"{m}.pth", m) for m in ("caer", "caers")}
    videos = sorted((demo / "CAER" / "test").glob("*/*.avi"))[:3]
    images = sorted((demo / "CAER-S" / "test").glob("*/*.png"))[:2]
    odd = [write_video(d / f"v{n}_{fps}.mp4", frames=n, fps=fps, size=(72, 104), seed=n)
           for n, fps in ((5, 8), (61, 25))]
    png = write_png(d / "noface.png")
    out = {}
    for m in ("caer", "caers"):
        for det in ("haar", None):
            p = Predictor(ck[m], device="cpu", detector=det, stream_chunk=2)
            for v in videos + odd + images + [png]:
                out[f"{m}/{det}/{v.relative_to(d).as_posix()}"] = p.predict_file(v).to_dict()
        p = Predictor(ck[m], device="cpu", detector=None)
        for v in videos[:2]:
            out[f"{m}/boxes/{v.relative_to(d).as_posix()}"] = p.predict_file(v, known_boxes=boxes_for(v, demo / "CAER" / "test.faces.csv")).to_dict()
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, (20, 64, 80, 3), dtype=np.uint8)
        out[f"{m}/frames/boxes"] = p.predict_frames(frames, boxes=np.tile([10, 8, 40, 44], (20, 1))).to_dict()
        out[f"{m}/frames/fps25"] = p.predict_frames(frames, fps=25).to_dict()
        out[f"{m}/frames/image"] = p.predict_frames(frames[0]).to_dict()
    return out


def compare(old: dict, new: dict, atol=1e-5) -> list:
    bad = []
    for key, a in old.items():
        b = new.get(key)
        if b is None:
            bad.append(f"{key}: missing")
            continue
        for f in ("emotion", "frames_used", "frames_with_face", "face_found", "face_boxes", "kind", "fps", "note"):
            if a.get(f) != b.get(f):
                bad.append(f"{key}: {f} {a.get(f)!r} != {b.get(f)!r}")
        def close(x, y, what):
            if abs(x - y) > atol:
                bad.append(f"{key}: {what} {x} != {y}")
        for c, v in a["probabilities"].items():
            close(v, b["probabilities"][c], f"p[{c}]")
        for k in ("face", "context"):
            close(a["fusion_weights"][k], b["fusion_weights"][k], f"lambda {k}")
        if len(a["clips"]) != len(b["clips"]):
            bad.append(f"{key}: {len(a['clips'])} clips != {len(b['clips'])}")
        for ca, cb in zip(a["clips"], b["clips"]):
            for f in ("first_frame", "last_frame", "start_s", "end_s", "face_found", "emotion"):
                if ca[f] != cb[f]:
                    bad.append(f"{key}: clip {ca['clip']} {f} {ca[f]} != {cb[f]}")
            for c, v in ca["probabilities"].items():
                close(v, cb["probabilities"][c], f"clip {ca['clip']} p[{c}]")
        if a["attention"]["clip"] != b["attention"]["clip"]:
            bad.append(f"{key}: attention clip")
        elif not np.allclose(a["attention"]["values"], b["attention"]["values"], atol=atol):
            bad.append(f"{key}: attention values")
    return bad


if __name__ == "__main__":
    mode, path = sys.argv[1], Path(sys.argv[2])
    res = answers()
    if mode == "record":
        path.write_text(json.dumps(res, separators=(",", ":")) + "\n")
        print(f"{len(res)} answers → {path}")
    else:
        bad = compare(json.loads(path.read_text()), res)
        print("\n".join(bad) or f"all {len(res)} answers agree to 1e-5")
        sys.exit(1 if bad else 0)
