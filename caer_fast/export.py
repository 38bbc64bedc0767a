"""Export a CAER-Net / CAER-Net-S checkpoint to ONNX.

    python -m caer_fast.export --checkpoint runs/demo/both/checkpoint.pth --format onnx --output caer.onnx

The command line over :func:`caer_fast.serving.onnx.export_onnx` (the graph's inputs and outputs are
described there): inputs ``face`` and ``context`` (preprocessed, dynamic batch), outputs ``logits``,
``attention`` and ``fusion_weights``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .models.checkpoint import CheckpointError
from .serving.onnx import export_onnx

FORMATS = ("onnx",)


def get_args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m caer_fast.export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="our checkpoint.pth or a community CAER-S one")
    ap.add_argument("--format", choices=FORMATS, default="onnx")
    ap.add_argument("--output", type=Path, default=None, help="default: the checkpoint's name with .onnx")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    ap.add_argument("--dynamo", action="store_true",
                    help="use the torch.export-based exporter (needs onnxscript) instead of the TorchScript one")
    return ap


def _check_output(out: Path) -> str:
    """Why ``out`` cannot be written (checked before the export's seconds are spent), or ''."""
    if out.is_dir():
        return f"--output {out}: is a folder, not a file name"
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # the export creates missing folders
        parent = parent.parent
    if not parent.is_dir():
        return f"--output {out}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--output {out}: {parent} is not writable"
    if out.exists() and not os.access(out, os.W_OK):
        return f"--output {out}: the file exists and is not writable"
    return ""


def main(argv=None) -> int:
    ap = get_args_parser()
    args = ap.parse_args(argv)
    if args.opset is not None and args.opset < 7:
        ap.error(f"--opset {args.opset}: ONNX opsets start at 7 for these operators")
    if not args.checkpoint.is_file():
        print(f"error: --checkpoint {args.checkpoint}: no such file", file=sys.stderr)
        return 2
    out = args.output or args.checkpoint.with_suffix(".onnx")
    problem = _check_output(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        info = export_onnx(args.checkpoint, out, args.opset, dynamo=args.dynamo)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output's folder cannot be created or written
        print(f"error: --output {out}: cannot write it ({exc.strerror or exc})", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, ImportError) as exc:  # an opset the exporter lacks; --dynamo without onnxscript
        what = f"--opset {args.opset}" if args.opset is not None and "opset" in str(exc).lower() else "export failed"
        print(f"error: {what}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__}",
              file=sys.stderr)
        return 2
    print(f"wrote {info['output']}: {info['model']}, inputs face N×{'×'.join(map(str, info['face']))}, "
          f"context N×{'×'.join(map(str, info['context']))}; outputs logits N×{len(info['classes'])}, "
          f"attention, fusion_weights N×2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
