"""HTTP inference server for a CAER-Net / CAER-Net-S checkpoint.

    python -m caer_fast.serve --checkpoint runs/demo/both/checkpoint.pth            # 127.0.0.1:8000
    curl -s http://127.0.0.1:8000/health
    curl -s -F file=@clip.avi http://127.0.0.1:8000/predict

Concurrent requests are micro-batched into one model call (``--max-batch`` inputs, waiting at most
``--max-wait-ms`` for company). It binds 127.0.0.1 unless told otherwise: put a reverse proxy with
authentication in front before exposing it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data.detectors import DETECTORS


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m caer_fast.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="our checkpoint.pth or a community CAER-S checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="most model inputs (clips or frames) per model call")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first queued request waits for others to share its model call")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload")
    p.add_argument("--max-frames", type=int, default=3000,
                   help="longest accepted video, in decoded frames (3000 = 100 s at 30 fps)")
    p.add_argument("--detector", default="haar", choices=DETECTORS + ("none",))
    p.add_argument("--detect-every", type=int, default=4, help="detect faces on every k-th sampled frame")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=2, help="threads decoding and preprocessing uploads")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    import uvicorn

    from .data.detectors import DetectorUnavailable
    from .models.checkpoint import CheckpointError
    from .serving.app import create_app
    from .serving.inference import Predictor, set_threads_from_env

    set_threads_from_env()
    try:
        predictor = Predictor(args.checkpoint, device=args.device, detect_every=args.detect_every,
                              detector=None if args.detector == "none" else args.detector,
                              max_frames=args.max_frames, batch_size=max(args.max_batch, 1))
    except (CheckpointError, DetectorUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(predictor, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     max_upload_mb=args.max_upload_mb, preprocess_threads=args.threads)
    print(f"caer_fast serving {predictor.model_type} ({args.checkpoint}) on http://{args.host}:{args.port} "
          f"— max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
