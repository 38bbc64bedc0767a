"""Annotate a whole corpus: every video and image under some folders, one row each, resumable.

    python -m caer_fast.annotate videos/ --checkpoint ck.pth --out ann/                # this machine
    python -m caer_fast.annotate list.txt more/ --checkpoint ck.pth --out ann/ --ray   # a local Ray
    python -m caer_fast.annotate videos/ --checkpoint ck.pth --out ann/ --ray 10.0.0.1:6379   # a cluster

Writes ann/videos.parquet (one row per input: path, status ok|error, error, emotion, confidence, p_<class>,
clips, seconds, engine, …) and ann/clips.parquet (one row per clip and person), each with a .csv beside it.
A bad file is an error row naming its problem; a rerun with the same --out does only what is missing.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from .annotation import AnnotateError, Options, annotate
from .data.detectors import resolve_detector
from .devices import resolve_device
from .predict import get_args_parser as predict_parser
from .serving.engines.cli import USER_ERRORS, add_engine_arguments, check_engine_arguments, report_error

# predict's options that mean the same here (taken from its parser, not copied)
SHARED = ("checkpoint", "detector", "detect_every", "boxes", "device", "no_progress")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one to show (not for required options, flags, or None)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m caer_fast.annotate", description=__doc__.split("\n\n")[0],
                                formatter_class=_Help)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video or image files, folders (searched recursively for .avi, .mp4, …, .png, .jpg, …) "
                        "or manifests (.txt / .csv / .lst: one path a line, or a 'path' column)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="DIR/videos.parquet, DIR/clips.parquet (+ .csv), DIR/parts/ (the resumable part files)")
    for action in predict_parser()._actions:
        if action.dest in SHARED:
            if action.dest == "detector":  # predict's text speaks of --people, which annotate does not have
                action = copy.copy(action)
                action.help = ("face detector. auto: haar (one face per frame, the largest: predict's default "
                               "answers). none: context only")
            p._add_action(action)
    add_engine_arguments(p)  # --engine, --int8 (= --engine int8), --calibrate…
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run on Ray Data: a Ray started for the job on this machine, or the cluster at ADDRESS "
                        "(host:port of `ray start --head`, or auto)")
    p.add_argument("--workers", type=int, default=2,
                   help="decode + detect processes (embedded) or Ray decode actors")
    p.add_argument("--model-actors", type=int, default=1,
                   help="with --ray: model actors (one GPU each where the cluster has GPUs, else one CPU each); "
                        "the stage to widen on a CPU cluster, where the model is the slow stage")
    p.add_argument("--batch-size", type=int, default=16, help="model inputs per model call, across videos")
    p.add_argument("--part-videos", type=int, default=16,
                   help="videos per part file (the unit that a killed job redoes)")
    return p


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_engine_arguments(parser, args)
    if min(args.workers, args.batch_size, args.part_videos, args.model_actors) < 1:
        parser.error("--workers, --model-actors, --batch-size and --part-videos must be >= 1")
    try:
        device = None if args.device is None else str(resolve_device(args.device))
        detector = None if args.detector == "none" else resolve_detector(args.detector)
        opts = Options(str(args.checkpoint), device=device, detector=detector,
                       detect_every=args.detect_every, boxes=args.boxes, engine=args.engine,
                       calibrate=None if args.calibrate is None else str(args.calibrate),
                       calibrate_samples=args.calibrate_samples, batch_size=args.batch_size)
        s = annotate(args.inputs, args.out, opts, ray=args.ray, workers=args.workers, model_actors=args.model_actors,
                     progress=not args.no_progress, part_videos=args.part_videos)
    except (*USER_ERRORS, AnnotateError, LookupError) as exc:
        return report_error(exc, args)
    print(f"{s.total} inputs: {s.ok} annotated, {s.errors} errors, {s.skipped} already done"
          f"\nvideos: {s.videos}\nclips:  {s.clips}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
