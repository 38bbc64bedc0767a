"""``python -m caer_fast.faces --data ROOT``: write face-box files for a CAER or CAER-S tree."""
from __future__ import annotations

import argparse
import os
import sys

from . import DEFAULT_EVERY, DETECTORS, FacesError, run
from ..data.detectors import DetectorUnavailable


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of this command
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(argv=None):
    p = _Parser(
        prog="python -m caer_fast.faces",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Detect one face per frame in a CAER (video) or CAER-S (image) tree and write the box files.",
        epilog=f"""layouts (found automatically; --layout to force):
  CAER    ROOT/{{train,validation,test}}/<Emotion>/*.avi  ->  ROOT/<split>.faces.csv
          header path,frame,x1,y1,x2,y2,score; path relative to ROOT; one line per frame with a face
  CAER-S  ROOT/{{train,test}}/<Emotion>/*.png           ->  ROOT/<split>.txt
          community CSV path,label,x1,y1,x2,y2; path relative to the split folder; label from <Emotion>

videos: the detector runs on frames 0, K, 2K, ... (--every K, default {DEFAULT_EVERY}). A frame in between
  gets the box of the nearest sampled frame, or a linear interpolation when the sampled frames on both
  sides found the same face; a frame whose nearest sampled frame found no face gets no box, so no face
  is carried more than K/2 frames from a detection.
per frame the largest face among the confident detections is kept.

resuming: finished files are logged to ROOT/.faces-<split>.log.jsonl; running again with the same
  settings skips them and rewrites the box file atomically. --overwrite starts afresh.
bad files (empty, corrupt, undecodable) are skipped, counted and named in the summary; truncated ones
  keep the boxes of the frames that decode and are counted as "truncated / partly decodable"; missing,
  misnamed (sad) or extra (Contempt) emotion folders are warned about; --strict makes each an error.
detectors: haar (OpenCV, built in), mtcnn (weights shipped); dlib-cnn, dlib-hog need: pip install dlib-bin face-recognition-models""")
    p.add_argument("--data", required=True, metavar="ROOT", help="the CAER or CAER-S root folder")
    p.add_argument("--detector", choices=DETECTORS, default="haar", help="face detector (default: haar)")
    p.add_argument("--every", type=int, default=DEFAULT_EVERY, metavar="K",
                   help=f"videos: run the detector on every K-th frame (default {DEFAULT_EVERY}; 1 = every frame)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="processes working on files in parallel (default: all cores)")
    p.add_argument("--splits", nargs="+", metavar="SPLIT",
                   help="splits to do (default: those present of train validation test / train test)")
    p.add_argument("--layout", choices=("auto", "video", "image"), default="auto",
                   help="CAER videos or CAER-S images (default: auto, from the files found)")
    p.add_argument("--min-size", type=int, default=32, metavar="PX",
                   help="smallest face side kept, in frame pixels (default 32)")
    p.add_argument("--detect-height", type=int, default=-1, metavar="PX",
                   help="downscale taller frames to this height before detecting (default: 240 for haar, "
                        "full resolution for dlib; 0 = full resolution)")
    p.add_argument("--overwrite", action="store_true", help="ignore earlier results and start afresh")
    p.add_argument("--strict", action="store_true", help="stop with an error at the first bad file")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show the progress bar (default: only on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summaries = run(args.data, args.layout, args.splits, args.detector, args.every, args.min_size,
                        args.detect_height, max(1, args.workers), args.strict, args.overwrite, args.progress)
    except (FacesError, DetectorUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while writing a box file
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    for s in summaries:
        print("\n".join(s.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
