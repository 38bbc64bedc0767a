"""The engine flags of ``predict`` and ``serve``, added and checked in one place.

- :func:`add_engine_arguments`: ``--engine``, ``--int8`` (an alias of ``--engine int8``), ``--calibrate``,
  ``--calibrate-samples``;
- :func:`check_engine_arguments`: the parser's errors for bad combinations;
- :func:`engine_from_args`: reads the checkpoint, builds the engine the flags name; the caller hands both
  to :class:`~caer_fast.serving.inference.Predictor` (``Predictor(ckpt, ..., engine=engine)``);
- :data:`USER_ERRORS` and :func:`report_error`: the errors every CLI (predict, serve, annotate) answers with
  one line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

from ...data.calibration import CALIBRATION_FILE
from ...data.detectors import DetectorUnavailable
from ...devices import DeviceError
from ...models.checkpoint import CheckpointError
from . import engine_for_checkpoint, engine_names
from .base import Engine, EngineError

ENV_VAR = "CAER_FAST_ENGINE"

# a user's mistake or a missing piece, not a bug: one line on stderr, no traceback
USER_ERRORS = (CheckpointError, DetectorUnavailable, DeviceError, EngineError)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """--engine, --int8 / --calibrate / --calibrate-samples (python -m caer_fast.predict and .serve)."""
    p.add_argument("--engine", default=os.environ.get(ENV_VAR, "auto"), choices=engine_names(),
                   help="CPU inference engine: auto measures ONNX Runtime and OpenVINO (if installed) on our ONNX "
                        "export and eager PyTorch once per "
                        "model and machine, keeps the fastest whose outputs match the model, and caches the choice "
                        "and the optimised graphs in $CAER_FAST_CACHE_DIR/engines (default from $CAER_FAST_ENGINE)")
    g = p.add_argument_group("int8 inference (CPU)")
    g.add_argument("--int8", action="store_true",
                   help="same as --engine int8: quantise the model to int8 (PT2E + X86InductorQuantizer, oneDNN "
                        "kernels via torch.compile) before serving: about 2x the fp32 compiled model's speed at "
                        "batch 32 (4x eager) on an AVX2 CPU, same accuracy on the demo test set. "
                        "The video model (CAER-Net) is quantised by OpenVINO + NNCF and kept only if its top-1 "
                        "agreement with fp32 on held-out clips is >= 99%%. Calibration: --calibrate ROOT, or the "
                        "calibration.pt train saves beside the checkpoint")
    g.add_argument("--calibrate", type=Path, default=None, metavar="ROOT",
                   help="CAER-S tree (image model) or CAER tree (video model) to calibrate --engine int8 on "
                        "(ROOT/train/<Emotion>/…, or a folder holding CAER-S/ or CAER/, e.g. the demo data of "
                        "python -m caer_fast.data.synthetic), or a calibration.pt; default: the calibration.pt "
                        "beside the checkpoint. With --engine auto it lets auto measure int8 too (video model)")
    g.add_argument("--calibrate-samples", type=int, default=64, metavar="N",
                   help="train-split images used for calibration, spread evenly over the classes")


def check_engine_arguments(p: argparse.ArgumentParser, args) -> None:
    """``--int8`` becomes ``--engine int8``; calibration only with it, and required by it."""
    if args.int8:
        if args.engine not in ("int8", p.get_default("engine")):
            p.error(f"--int8 is --engine int8; it cannot be combined with --engine {args.engine}")
        args.engine = "int8"
    args.int8 = args.engine == "int8"
    if args.calibrate is not None and args.engine not in ("int8", "auto"):
        p.error("--calibrate is only used with --engine int8 or auto (--int8)")
    if args.calibrate_samples < 1:
        p.error(f"--calibrate-samples must be >= 1, got {args.calibrate_samples}")


def engine_from_args(args, checkpoint, *, device="cpu", batch_sizes: Optional[Sequence[int]] = None,
                     warmup_batch_sizes: Optional[Sequence[int]] = None, cache_dir="default",
                     out=None) -> Tuple[dict, Engine]:
    """(the checkpoint as read, the engine ``args`` names for its model on ``device``): see
    :func:`~caer_fast.serving.engines.engine_for_checkpoint`. ``warmup_batch_sizes``: what ``int8``
    compiles before returning (default ``batch_sizes``). Raises
    :class:`~caer_fast.models.checkpoint.CheckpointError` or :class:`~caer_fast.serving.engines.EngineError`
    with one line to show."""
    options = {}
    if args.engine in ("int8", "auto"):
        calibration = args.calibrate
        beside = Path(checkpoint).parent / CALIBRATION_FILE
        if calibration is None and beside.is_file():
            calibration = beside  # what train saved: `predict --engine int8` needs nothing more
        options = {"calibration": calibration, "calibration_samples": args.calibrate_samples}
        if args.engine == "int8" and (warmup_batch_sizes is not None or batch_sizes is not None):
            options["warmup_batch_sizes"] = tuple(warmup_batch_sizes or batch_sizes)
    if args.engine == "auto":
        options["background"] = True  # a cold cache answers with eager while auto measures (docs/engines.md)
    return engine_for_checkpoint(checkpoint, args.engine, device=device, batch_sizes=batch_sizes,
                                 cache_dir=cache_dir, out=out, **options)


def report_error(exc: BaseException, args) -> int:
    """Print ``exc`` as a CLI's one-line error (an engine's names the ``--engine`` asked for); returns 2, the
    exit status."""
    flag = f"--engine {args.engine}: " if isinstance(exc, EngineError) else ""
    print(f"error: {flag}{exc}", file=sys.stderr)
    return 2
