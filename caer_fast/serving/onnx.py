"""ONNX export of CAER-Net / CAER-Net-S (what ``python -m caer_fast.export`` and the ``onnxruntime`` /
``openvino`` engines run).

The graph takes the preprocessed inputs (``face``, ``context``: float32, normalised, as
:func:`caer_fast.ops.face_context` gives them; the batch dimension is dynamic) and returns ``logits``
N×7, ``attention`` (N×1×h×w, or N×1×t×h×w for the video model) and ``fusion_weights`` N×2 (λ face,
λ context). Decoding, face detection and preprocessing stay outside the graph.

The fused ops (``attention_pool``, ``adaptive_fusion``) are traced through their PyTorch reference
backend (:func:`caer_fast.ops.use_backend` ``"torch"`` during export): the C++/Triton/CUDA kernels are
not ONNX operators, the reference is plain softmax/multiply/mean, which every ONNX runtime has.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..constants import CLASSES
from ..models.caer_net import OUTPUT_NAMES, CAERNet, WithDetails
from ..models.checkpoint import input_sizes, load_checkpoint, read_checkpoint
from ..ops import use_backend


def example_inputs(model, face_size, crop_size, clip_frames: int, batch: int = 2):
    if isinstance(model, CAERNet):
        return (torch.randn(batch, 3, clip_frames, *face_size), torch.randn(batch, 3, clip_frames, *crop_size))
    return torch.randn(batch, 3, *face_size), torch.randn(batch, 3, *crop_size)


def export_model_onnx(model, face_shape, context_shape, output, opset: Optional[int] = None,
                      dynamo: bool = False) -> Path:
    """Write ``output`` (.onnx) for a live model; ``face_shape`` / ``context_shape`` without the batch
    dimension (which is dynamic). The model's own train/eval mode is left as it was."""
    was_training = model.training
    # eval() on the wrapper too: the TorchScript exporter restores the wrapper's mode afterwards, recursively,
    # which would leave a train-mode wrapper's model in train mode (BN on batch statistics)
    wrapped = WithDetails(model).eval()
    inputs = (torch.randn(2, *face_shape), torch.randn(2, *context_shape))  # batch 2: not specialised to 1
    dynamic = {name: {0: "batch"} for name in ("face", "context", *OUTPUT_NAMES)}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {} if opset is None else {"opset_version": int(opset)}
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with use_backend("torch"), torch.no_grad(), warnings.catch_warnings():
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
    ckpt = read_checkpoint(checkpoint)
    model = load_checkpoint(ckpt).eval()
    sizes = input_sizes(ckpt, model)  # the sizes predict feeds this checkpoint
    face, context = sizes["face_shape"], sizes["context_shape"]
    export_model_onnx(model, face, context, output, opset, dynamo)
    kind = ckpt.get("model_type") or ("caer" if isinstance(model, CAERNet) else "caers")
    return {"output": str(output), "model": kind, "classes": list(ckpt.get("classes") or CLASSES),
            "face": list(face), "context": list(context)}
