"""`quantize_int8(model, calibration)`: int8 inference of CAER-Net-S on x86 CPUs.

PyTorch's own post-training quantisation flow for the inductor backend (PT2E), which since torch 2.10
lives in ``torchao`` (``torch.ao.quantization.quantize_pt2e`` is gone in torch 2.13):

1. a private eval copy of the model (the user's weights are never touched), batch norm folded into the
   convolutions;
2. ``torch.export.export`` with a dynamic batch dimension (any batch size from 1 up, one export);
3. ``prepare_pt2e`` with ``X86InductorQuantizer`` and its default recipe
   (``get_default_x86_inductor_quantization_config()``: static per-tensor uint8 activations with
   histogram observers, per-channel symmetric int8 weights) for every conv2d and linear; the
   calibration batches run through the observed graph;
4. ``convert_pt2e`` (quantize / dequantize pairs around the int8 ops), then ``torch.compile`` with
   inductor ``freezing``: the pattern matcher lowers each dequantize → conv / linear → quantize to a
   oneDNN int8 kernel (``onednn.qconv_pointwise`` / ``qlinear_pointwise``), with the ReLU and, where the
   next op takes int8, the requantisation fused in.

What stays fp32: the fused ops :func:`caer_fast.ops.attention_pool` and
:func:`caer_fast.ops.adaptive_fusion` (``torch.library`` custom ops, opaque to the quantizer: their
inputs are the fp32 outputs of the int8 convs / linears), the softmaxes, means and the fusion-net batch
norms (as ``x * scale + shift``: with no batch norm left in the graph, ``convert_pt2e`` skips a QAT
folding pass that costs about 20 s and finds nothing here). The attention map and fusion weights are returned as for the fp32 model (``return_details=True``).

Three details:

- The encoder calls ``F.relu``; the quantizer's conv+ReLU recipe matches module-style ReLUs
  (``nn.ReLU``), so the ReLU after each conv is relabelled in the exported graph. Without it the conv
  outputs stay fp32 into the max-pools (measured 1.3x slower at batch 32).
- CPUs without VNNI (AVX2 only): 7-bit activations (``reduce_range``, chosen by
  :func:`caer_fast.devices.has_vnni`), as the quantizer's docs advise; with 8 bits oneDNN's int16 pair sums saturate (see :func:`quantize_int8`).
- Batch size: one export serves every batch size, but inductor specialises the compiled kernels on
  batch-size ranges (observed: 1, 2-15, >= 16), each compiled on first use (about 10 s each on the
  2-core build machines). ``warmup_batch_sizes`` compiles them up front (the CLIs warm 1, 2 and the
  server's ``--max-batch``).

Not supported: the video CAER-Net. Its convolutions are ``Conv3d``, and the X86InductorQuantizer of
torchao 0.18 annotates ``conv1d`` / ``conv2d`` / ``linear`` only (its ``default_quantizable_ops``), so
quantising it would leave every convolution in fp32 and only the small fusion-net linears in int8: a
clear :class:`NotImplementedError` instead. Only CPU: the int8 kernels are oneDNN's x86 ones.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..devices import has_vnni
from .caer_net import CAERNet, CAERSNet, WithDetails
from .fold import fold_batch_norm

log = logging.getLogger("caer_fast.quantize")
# inductor's int8 lowering calls torch.tensor(a_tensor) on each compile: not ours to fix, and not actionable
warnings.filterwarnings("ignore", message="To copy construct from a tensor", module="torch._inductor.mkldnn_lowerings")

TORCHAO_HINT = "pip install torchao==0.18.0 (pinned in requirements.txt; or pip install caer_fast[int8])"


class QuantizationUnavailable(RuntimeError):
    """torchao (the PT2E quantisation flow) is missing or does not work with this torch."""


def _torchao():
    """Import the PT2E pieces of torchao, quietly (its CUDA-only extensions fail to load on CPU builds)."""
    ao_log = logging.getLogger("torchao")
    level = ao_log.level
    ao_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except Exception as exc:  # ImportError, or an incompatible build
        raise QuantizationUnavailable(f"int8 quantisation needs torchao: {type(exc).__name__}: {exc} "
                                      f"({TORCHAO_HINT})") from exc
    finally:
        ao_log.setLevel(level)
    return prepare_pt2e, convert_pt2e, xiq


def conv3d_supported() -> bool:
    """Does the installed X86InductorQuantizer annotate conv3d? (torchao 0.18: no.)"""
    _, _, xiq = _torchao()
    return torch.ops.aten.conv3d.default in xiq.default_quantizable_ops


def check_quantizable(model: nn.Module) -> None:
    """Raise the error :func:`quantize_int8` would give for ``model`` (wrong class, video model, not on
    CPU) before any calibration data is read."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int8: expected a CAERSNet module, got {type(model).__name__}")
    if isinstance(model, CAERNet) or any(isinstance(m, nn.Conv3d) for m in model.modules()):
        if not conv3d_supported():
            raise NotImplementedError(
                "quantize_int8: the video CAER-Net is not supported: its convolutions are Conv3d, and "
                "torchao's X86InductorQuantizer annotates only conv1d/conv2d/linear, so every convolution "
                "would stay fp32 (no int8 speed-up). Use caer_fast.optimize(model, 'inference') for it.")
    if not isinstance(model, CAERSNet):
        raise TypeError(f"quantize_int8: supports caer_fast.models.CAERSNet (the image model), got "
                        f"{type(model).__name__} (a community model loads into CAERSNet with "
                        f"caer_fast.load_checkpoint)")
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "cpu":
        raise ValueError(f"quantize_int8: int8 inference runs on CPU (oneDNN x86 kernels); the model is on "
                         f"{p.device}: move it with .cpu() first")


def _as_pair(batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(face, context) from a calibration item: a (face, context, …) tuple/list or a dict with those keys."""
    if isinstance(batch, dict):
        if "face" not in batch or "context" not in batch:
            raise ValueError(f"quantize_int8: a calibration dict needs 'face' and 'context', got {sorted(batch)}")
        face, context = batch["face"], batch["context"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        face, context = batch[0], batch[1]
    else:
        raise ValueError("quantize_int8: calibration items must be (face, context) pairs or dicts with "
                         f"'face' and 'context', got {type(batch).__name__}")
    if not (isinstance(face, torch.Tensor) and isinstance(context, torch.Tensor)):
        raise ValueError("quantize_int8: calibration face and context must be tensors")
    if face.dim() != 4 or context.dim() != 4 or face.shape[0] != context.shape[0] or face.shape[0] < 1:
        raise ValueError(f"quantize_int8: calibration batches must be N×3×H×W face and context with the same "
                         f"N >= 1, got {tuple(face.shape)} and {tuple(context.shape)}")
    return face.float().cpu().contiguous(), context.float().cpu().contiguous()


def _relabel_relus(gm: torch.fx.GraphModule) -> int:
    """Mark each ReLU that follows a conv2d as an ``nn.ReLU`` so the quantizer's conv+ReLU recipe matches."""
    n_done = 0
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target is torch.ops.aten.relu.default
                and isinstance(node.args[0], torch.fx.Node) and node.args[0].target is torch.ops.aten.conv2d.default
                and len(node.args[0].users) == 1):
            stack = list(node.meta.get("source_fn_stack") or [])
            name = stack[-1][0] if stack else node.name
            node.meta["source_fn_stack"] = stack[:-1] + [(name, nn.ReLU)]
            n_done += 1
    return n_done


class _Affine(nn.Module):
    """An eval-mode BatchNorm1d as ``x * scale + shift`` (same values up to rounding)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _replace_batch_norms(model: nn.Module) -> int:
    """Replace the batch norms left after :func:`fold_batch_norm` (the fusion net's BatchNorm1d) by
    affine maps, in place. With no batch norm in the graph, ``convert_pt2e`` skips its QAT conv-BN
    folding pass, which re-exports 96 patterns (about 20 s on the build machines) to find nothing."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                if child.running_mean is None:
                    raise ValueError(f"quantize_int8: {name} has no running statistics")
                setattr(parent, name, _Affine(child))
                n += 1
    return n


class Int8Model(nn.Module):
    """What :func:`quantize_int8` returns: call it like the model, ``(face, context, return_details=False)``.

    ``info`` records what was done: calibration sample / batch counts and time, how many convs and
    linears run in int8, export / compile times, and the batch sizes compiled so far.
    ``quantized_graph`` is the converted (uncompiled) graph module, for inspection.
    """

    def __init__(self, quantized_graph: torch.fx.GraphModule, call, input_shapes, info: dict):
        super().__init__()
        self.__dict__["quantized_graph"] = quantized_graph  # not a submodule: keeps repr and state_dict small
        self._call = call
        self._input_shapes = input_shapes  # (face C×H×W, context C×H×W)
        self.info = info

    def warmup(self, batch_sizes: Iterable[int]) -> float:
        """Compile (and run once) for each batch size; returns the seconds it took."""
        t = time.perf_counter()
        fs, cs = self._input_shapes
        for b in sorted({int(b) for b in batch_sizes if int(b) >= 1}):
            self(torch.zeros(b, *fs), torch.zeros(b, *cs))
        return time.perf_counter() - t

    def forward(self, face: torch.Tensor, context: torch.Tensor, return_details: bool = False):
        fs, cs = self._input_shapes
        if (face.dim() != 4 or context.dim() != 4 or tuple(face.shape[1:]) != fs or tuple(context.shape[1:]) != cs
                or face.shape[0] != context.shape[0]):
            raise ValueError(f"Int8Model: expects face N×{'×'.join(map(str, fs))} and context "
                             f"N×{'×'.join(map(str, cs))} (the calibration sizes), got {tuple(face.shape)} "
                             f"and {tuple(context.shape)}")
        n = int(face.shape[0])
        if n == 0:
            raise ValueError("Int8Model: empty batch")
        first = n not in self.info["batch_sizes_seen"]
        t = time.perf_counter()
        # always inference_mode (whatever the caller's grad mode): dynamo guards on it, so a warm-up under
        # no_grad would otherwise be recompiled by the first call under inference_mode
        with torch.inference_mode(), warnings.catch_warnings():
            if first:  # may compile: inductor's int8 lowering warns about its own torch.tensor(a_tensor)
                warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            logits, attention, weights = self._call(face.float().contiguous(), context.float().contiguous())
        if first:
            self.info["batch_sizes_seen"].append(n)
            if self.info["first_call_s"] is None:
                self.info["first_call_s"] = time.perf_counter() - t
        if return_details:
            return logits, {"attention": attention, "fusion_weights": weights}
        return logits

    def extra_repr(self) -> str:
        i = self.info
        return (f"int8 convs={i['int8_convs']}, int8 linears={i['int8_linears']}, "
                f"calibration_samples={i['calibration_samples']}, compiled={i['compiled']}")


def quantize_int8(model: nn.Module, calibration: Iterable, *, compile: bool = True,
                  warmup_batch_sizes: Sequence[int] = (), max_calibration_batches: Optional[int] = None,
                  reduce_range: Optional[bool] = None) -> Int8Model:
    """Post-training static int8 quantisation of a :class:`CAERSNet` for CPU inference.

    Args:
        model: a :class:`~caer_fast.models.CAERSNet` (trained: BN statistics matter) on CPU. It is
            copied; its weights and mode are left as they are.
        calibration: an iterable of ``(face, context[, …])`` batches (N×3×H×W fp32, preprocessed as for
            inference) or dicts with ``face`` / ``context`` (what the datasets' DataLoader yields). A few
            dozen representative samples are enough; all batches must share H×W. See
            :func:`caer_fast.data.calibration.calibration_batches` to read them from a CAER-S tree.
        compile: lower to oneDNN int8 kernels with ``torch.compile`` (inductor, ``freezing``). ``False``
            gives the reference quantize/dequantize graph in fp32 arithmetic (same numbers up to rounding,
            slow; for debugging).
        warmup_batch_sizes: batch sizes to compile for now rather than on first use.
        max_calibration_batches: stop after this many batches.
        reduce_range: 7-bit activations (uint8 0..127). Default: on CPUs without VNNI (see
            :func:`caer_fast.devices.has_vnni`), where oneDNN's u8×s8 kernels add pairs of products in
            int16 and saturate
            with full-range activations. Measured on an AVX2 EPYC (demo CAER-S test set): mean |Δlogit|
            against fp32 0.186 compiled with 8-bit activations (20x the uncompiled reference graph's
            0.0093; 7 of 210 answers changed), 0.0075 with 7-bit (no answer changed).

    Returns:
        an :class:`Int8Model`: ``fast(face, context)`` → N×7 logits; ``return_details=True`` adds the
        attention map and fusion weights (computed in fp32 from the int8 features).

    Raises:
        NotImplementedError: the video :class:`~caer_fast.models.CAERNet` (Conv3d is not annotated by the
            x86 quantizer). TypeError: not a CAERSNet. ValueError: no or malformed calibration data, a
            model not on CPU. :class:`QuantizationUnavailable`: torchao missing.

    Example:
        >>> model = CAERSNet().eval()                                                # doctest: +SKIP
        >>> calib = [(torch.randn(8, 3, 96, 96), torch.randn(8, 3, 112, 112))] * 4   # doctest: +SKIP
        >>> fast = quantize_int8(model, calib)                                       # doctest: +SKIP
        >>> fast(torch.randn(2, 3, 96, 96), torch.randn(2, 3, 112, 112)).shape       # doctest: +SKIP
        torch.Size([2, 7])
    """
    check_quantizable(model)
    prepare_pt2e, convert_pt2e, xiq = _torchao()
    batches: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for i, b in enumerate(calibration):
        if max_calibration_batches is not None and i >= max_calibration_batches:
            break
        batches.append(_as_pair(b))
    if not batches:
        raise ValueError("quantize_int8: no calibration batches (give a few dozen representative samples)")
    shapes = {(tuple(f.shape[1:]), tuple(c.shape[1:])) for f, c in batches}
    if len(shapes) != 1:
        raise ValueError(f"quantize_int8: calibration batches have different input sizes: {sorted(shapes)}")
    face_shape, context_shape = shapes.pop()

    info = {"calibration_samples": sum(int(f.shape[0]) for f, _ in batches), "calibration_batches": len(batches),
            "input_shapes": {"face": list(face_shape), "context": list(context_shape)},
            "compiled": bool(compile), "batch_sizes_seen": [], "first_call_s": None,
            "quantizer": "X86InductorQuantizer (default config: uint8 activations per-tensor, int8 weights "
                         "per-channel)"}
    t0 = time.perf_counter()
    work = fold_batch_norm(copy.deepcopy(model).eval()).requires_grad_(False)
    _replace_batch_norms(work)
    wrapped = WithDetails(work).eval()
    f0, c0 = batches[0]
    if f0.shape[0] < 2:  # export an example batch > 1 so the batch dimension is not specialised to 1
        f0, c0 = f0.expand(2, *face_shape).contiguous(), c0.expand(2, *context_shape).contiguous()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        exported = torch.export.export(wrapped, (f0, c0), dynamic_shapes=({0: batch}, {0: batch}))
    gm = exported.module()
    info["relus_fused"] = _relabel_relus(gm)
    info["export_s"] = time.perf_counter() - t0

    if reduce_range is None:
        reduce_range = not has_vnni()
    info["reduce_range"] = bool(reduce_range)
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config(reduce_range=bool(reduce_range)))
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        # "The input of maxpool2d is not quantized": expected for a pool fed by an fp32 op, harmless
        warnings.filterwarnings("ignore", message="The input of maxpool2d is not quantized")
        prepared = prepare_pt2e(gm, quantizer)
    t2 = time.perf_counter()
    with torch.no_grad():
        for f, c in batches:
            prepared(f, c)
    t3 = time.perf_counter()
    converted = convert_pt2e(prepared)
    info["prepare_s"], info["calibration_s"], info["convert_s"] = t2 - t1, t3 - t2, time.perf_counter() - t3

    g = converted.graph
    dq_inputs = lambda n: any(isinstance(a, torch.fx.Node) and "dequantize" in str(a.target)  # noqa: E731
                              for a in n.args[:2])
    info["int8_convs"] = sum(1 for n in g.nodes if n.target is torch.ops.aten.conv2d.default and dq_inputs(n))
    info["int8_linears"] = sum(1 for n in g.nodes if n.target is torch.ops.aten.linear.default and dq_inputs(n))
    info["fp32_custom_ops"] = sorted({str(n.target).split(".")[1] for n in g.nodes
                                      if n.op == "call_function" and str(n.target).startswith("caer_fast.")})

    if compile:
        from torch._inductor import config as inductor_config

        # freezing: constant-folds the weights so the int8 patterns lower to oneDNN; dynamic: one graph
        # for all batch sizes of a range rather than a recompile per size
        compiled = torch.compile(converted, dynamic=True)

        def call(face, context):
            with inductor_config.patch(freezing=True):  # read when a batch-size range first compiles
                return compiled(face, context)
    else:
        call = converted
    out = Int8Model(converted, call, (face_shape, context_shape), info)
    if warmup_batch_sizes:
        info["warmup_s"] = out.warmup(warmup_batch_sizes)
    log.info("quantize_int8: calibrated on %d samples (%d batches) in %.1fs; %d convs + %d linears int8",
             info["calibration_samples"], info["calibration_batches"], info["calibration_s"],
             info["int8_convs"], info["int8_linears"])
    return out
