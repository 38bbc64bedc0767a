"""HTTP inference server for a CAER-Net / CAER-Net-S checkpoint.

    python -m caer_fast.serve --checkpoint runs/demo/both/checkpoint.pth            # 127.0.0.1:8000
    curl -s http://127.0.0.1:8000/health
    curl -s -F file=@clip.avi http://127.0.0.1:8000/predict
    python -m caer_fast.serve --checkpoint ck.pth --int8 --calibrate demo-data/CAER-S  # int8 (image model)

Concurrent requests are micro-batched into one model call (``--max-batch`` inputs, waiting at most
``--max-wait-ms`` for company). It binds 127.0.0.1 unless told otherwise: put a reverse proxy with
authentication in front before exposing it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from .data.detectors import AUTO, DETECTORS
from .devices import resolve_device
from .serving.app import default_memory_budget_mb, run_server
from .serving.engines.cli import USER_ERRORS, add_engine_arguments, check_engine_arguments, engine_from_args, \
    report_error
from .serving.inference import Predictor, set_threads_from_env


def _int_in(lo: int, hi: Optional[int] = None):
    """argparse type: an integer in [lo, hi] (a nonsense limit is refused at the command line)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {f'between {lo} and {hi}' if hi is not None else f'at least {lo}'}"
                                             f", got {v}")
        return v
    return parse


def _float_above(lo: float, allow_equal: bool = False):
    """argparse type: a finite number above ``lo`` (or equal to it with ``allow_equal``)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(v) and (v >= lo if allow_equal else v > lo)):
            raise argparse.ArgumentTypeError(f"must be a finite number {'≥' if allow_equal else 'above'} {lo:g}, "
                                             f"got {text}")
        return v
    return parse


_positive_float = _float_above(0.0)
_non_negative_float = _float_above(0.0, allow_equal=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m caer_fast.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="our checkpoint.pth or a community CAER-S checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000, help="TCP port (0: any free port)")
    p.add_argument("--max-batch", type=_int_in(1), default=8, help="most model inputs (clips or frames) per model call")
    p.add_argument("--max-wait-ms", type=_non_negative_float, default=10.0,
                   help="how long the first queued request waits for others to share its model call")
    p.add_argument("--max-upload-mb", type=_positive_float, default=50.0, help="largest accepted upload")
    p.add_argument("--max-frames", type=_int_in(1), default=3000,
                   help="longest accepted video, in decoded frames (3000 = 100 s at 30 fps)")
    p.add_argument("--max-frame-pixels", type=_int_in(1), default=3840 * 2160,
                   help="largest accepted frame or image, width × height (default 4K UHD); each video upload "
                        "reserves memory for its decoder at this size (a stream may grow after its header)")
    p.add_argument("--max-pixels", type=_int_in(1), default=3000 * 1920 * 1080,
                   help="decoded-pixel budget of one video (frames × width × height), checked from the stream "
                        "header and while decoding (default: 3000 frames of 1080p)")
    p.add_argument("--memory-budget-mb", type=_positive_float, default=None,
                   help="resident memory the server stays under: each request reserves its estimated peak "
                        "before decoding; one that never fits is refused (413), others wait (then 503). "
                        "Default: half the machine's memory (the cgroup limit if lower)")
    p.add_argument("--max-connections", type=_int_in(1), default=64,
                   help="open connections served at once; more are answered 503 at once")
    p.add_argument("--header-timeout", type=_positive_float, default=10.0,
                   help="seconds a client has to send its headers")
    p.add_argument("--body-timeout", type=_positive_float, default=30.0,
                   help="longest pause, in seconds, while a client sends its body (slower clients get 408)")
    p.add_argument("--detector", default=AUTO, choices=(AUTO,) + DETECTORS + ("none",),
                   help="face detector. auto: haar for one face per frame (POST /predict, people=main), mtcnn for "
                        "people=all|N (better recall when everyone counts), haar where mtcnn cannot load. "
                        "none: context only")
    p.add_argument("--max-people", type=_int_in(1), default=8, metavar="N",
                   help="most people one request follows (POST /predict?people=all follows that many, ?people=N at "
                        "most N); the request's memory reservation scales with it")
    p.add_argument("--detect-every", type=_int_in(1), default=4, help="detect faces on every k-th sampled frame")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=_int_in(1, 256), default=2, help="threads decoding and preprocessing uploads")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    add_engine_arguments(p)
    return p


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_engine_arguments(parser, args)
    set_threads_from_env()
    max_batch = max(args.max_batch, 1)
    try:
        device = resolve_device(args.device)
        ckpt, engine = engine_from_args(args, args.checkpoint, device=device, batch_sizes=(1, max_batch),
                                        warmup_batch_sizes=(1, min(2, max_batch), max_batch), out=sys.stderr)
        predictor = Predictor(ckpt, device=device, detect_every=args.detect_every,
                              detector=None if args.detector == "none" else args.detector,
                              max_frames=args.max_frames, batch_size=max_batch,
                              max_frame_pixels=args.max_frame_pixels, max_pixels=args.max_pixels, engine=engine)
    except USER_ERRORS as exc:
        return report_error(exc, args)
    budget = args.memory_budget_mb or default_memory_budget_mb()
    print(f"caer_fast serving {predictor.model_type}{' int8' if args.int8 else ''} with engine {engine.name} "
          f"({args.checkpoint}) on http://{args.host}:{args.port} "
          f"— max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, memory budget {budget:.0f} MiB", flush=True)
    run_server(predictor, args.host, args.port, log_level=args.log_level, max_connections=args.max_connections,
               header_timeout_s=args.header_timeout, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
               max_upload_mb=args.max_upload_mb, preprocess_threads=args.threads, memory_budget_mb=budget,
               body_timeout_s=args.body_timeout, max_people=args.max_people)
    return 0


if __name__ == "__main__":
    sys.exit(main())
