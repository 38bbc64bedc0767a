"""Export a CAER-Net / CAER-Net-S checkpoint to ONNX.

    python -m caer_fast.export --checkpoint runs/demo/both/checkpoint.pth --format onnx --output caer.onnx

The graph takes the preprocessed inputs (``face``, ``context``: float32, normalised, as
:func:`caer_fast.ops.face_context` gives them; the batch dimension is dynamic) and returns ``logits``
N×7, ``attention`` (N×1×h×w, or N×1×t×h×w for the video model) and ``fusion_weights`` N×2 (λ face,
λ context). Decoding, face detection and preprocessing stay outside the graph.

The fused ops (``attention_pool``, ``adaptive_fusion``) are traced through their PyTorch reference
backend (``CAER_FAST_BACKEND=torch`` is set during export): the C++/Triton/CUDA kernels are not ONNX
operators, the reference is plain softmax/multiply/mean, which every ONNX runtime has.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from .models.caer_net import CAERNet


class _Exported(torch.nn.Module):
    """The model with its details as plain outputs (ONNX graphs return tensors, not dicts)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, face, context):
        logits, d = self.model(face, context, return_details=True)
        return logits, d["attention"], d["fusion_weights"]


@contextlib.contextmanager
def reference_backend():
    """Force the PyTorch reference ops while tracing, then restore the caller's choice."""
    from .ops import use_backend

    with use_backend("torch"):
        yield


def example_inputs(model, face_size, crop_size, clip_frames: int, batch: int = 2):
    if isinstance(model, CAERNet):
        return (torch.randn(batch, 3, clip_frames, *face_size), torch.randn(batch, 3, clip_frames, *crop_size))
    return torch.randn(batch, 3, *face_size), torch.randn(batch, 3, *crop_size)


OUTPUT_NAMES = ("logits", "attention", "fusion_weights")


def export_model_onnx(model, face_shape, context_shape, output, opset: Optional[int] = None,
                      dynamo: bool = False) -> Path:
    """Write ``output`` (.onnx) for a live model; ``face_shape`` / ``context_shape`` without the batch
    dimension (which is dynamic). The model's own train/eval mode is left as it was."""
    was_training = model.training
    # eval() on the wrapper too: the TorchScript exporter restores the wrapper's mode afterwards, recursively,
    # which would leave a train-mode wrapper's model in train mode (BN on batch statistics)
    wrapped = _Exported(model).eval()
    inputs = (torch.randn(2, *face_shape), torch.randn(2, *context_shape))  # batch 2: not specialised to 1
    dynamic = {name: {0: "batch"} for name in ("face", "context", *OUTPUT_NAMES)}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {} if opset is None else {"opset_version": int(opset)}
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with reference_backend(), torch.no_grad(), warnings.catch_warnings():
            # the ops' input checks read shapes as Python bools: harmless constants in the trace
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            names = dict(input_names=["face", "context"], output_names=list(OUTPUT_NAMES))
            if dynamo:
                batch = torch.export.Dim("batch")
                torch.onnx.export(wrapped, inputs, str(tmp), dynamic_shapes=({0: batch}, {0: batch}),
                                  dynamo=True, external_data=False, **names, **kwargs)
            else:
                warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
                torch.onnx.export(wrapped, inputs, str(tmp), dynamic_axes=dynamic, dynamo=False,
                                  **names, **kwargs)
        os.replace(tmp, output)  # atomic: a reader never sees half a file
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return output


def export_onnx(checkpoint, output, opset: Optional[int] = None, dynamo: bool = False) -> dict:
    """Write ``output`` (.onnx) for the checkpoint's model; returns what was exported (names, shapes).

    ``dynamo=False`` (default) uses the TorchScript-based exporter: a few seconds, one self-contained file.
    ``dynamo=True`` uses the ``torch.export`` one (needs ``onnxscript``; about 4× slower to export here).
    Both give the same numbers (checked to 1e-8 on the logits)."""
    from .serving.inference import Predictor

    p = Predictor(checkpoint, device="cpu", detector=None)  # reads the sizes the same way predict does
    model = p.model.eval()
    crop = p.crop[2:] if p.crop else p.context_size
    face, context = example_inputs(model, p.face_size, crop, p.clip_frames, batch=1)
    export_model_onnx(model, face.shape[1:], context.shape[1:], output, opset, dynamo)
    return {"output": str(output), "model": p.model_type, "classes": p.classes,
            "face": list(face.shape[1:]), "context": list(context.shape[1:])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m caer_fast.export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="our checkpoint.pth or a community CAER-S one")
    ap.add_argument("--format", choices=("onnx",), default="onnx")
    ap.add_argument("--output", type=Path, default=None, help="default: the checkpoint's name with .onnx")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    ap.add_argument("--dynamo", action="store_true",
                    help="use the torch.export-based exporter (needs onnxscript) instead of the TorchScript one")
    args = ap.parse_args(argv)
    from .models.checkpoint import CheckpointError

    out = args.output or args.checkpoint.with_suffix(".onnx")
    if out.is_dir():
        ap.error(f"--output {out}: is a folder; give a file name ending in .onnx")
    if args.opset is not None:
        try:  # the exporters' range (a private table: fall back to torch 2.13's numbers)
            from torch.onnx import _constants as c

            top = c.ONNX_MAX_OPSET if args.dynamo else c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
        except (ImportError, AttributeError):
            top = 23 if args.dynamo else 20
        if not 7 <= args.opset <= top:
            ap.error(f"--opset {args.opset}: this exporter writes opsets 7 to {top}")
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
