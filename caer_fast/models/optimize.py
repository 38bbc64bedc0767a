"""`optimize(model, mode)`: the fastest callable form of one of our models on this device.

What each mode does, and why (figures: bench/RESULTS.md, "models (issue 5)"):

- ``inference``: a private copy of the model (the user's weights are never touched) in eval mode,
  batch norm folded into the preceding convolutions, ``torch.compile`` with ``fullgraph=True`` (the
  fused ops are ``torch.library`` custom ops, so there is no graph break; a failure falls back to a
  graph with breaks, then to eager, with the reason logged), run under ``torch.inference_mode``.
  Layouts: channels_last_3d weights for the 3-D model and for eager runs; the 2-D compiled graph
  takes inductor's own layout choice.
- ``train``: the user's own model (the optimizer's parameters stay the ones that train),
  ``torch.compile`` (layouts left to inductor, see ``channels_last`` below).
- On CUDA (not testable on the CPU build machines): bf16 autocast, and CUDA graphs
  (``mode="reduce-overhead"``) for inference.
- ``train`` on CPU, ``precision="auto"``: bf16 autocast only where the CPU computes bf16 natively
  (AVX-512 BF16 / AMX), a measured bf16 train step is faster than fp32 and the convergence guard holds
  (:func:`choose_train_precision`, run once on the first call); fp32 elsewhere (AVX2-only CPUs emulate bf16).

The optimized form is cached on the model, so calling ``optimize`` again never compiles again;
an inference copy whose source weights changed since (training went on) gets the new folded
weights copied in, without recompiling.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import time
from typing import Optional

import torch
import torch.nn as nn

from .. import devices
from ..data.index_cache import cache_dir
from ..ops import preload
from .fold import fold_batch_norm

MODES = ("train", "inference")
PRECISIONS = ("auto", "fp32", "bf16")
_CACHE_ATTR = "_caer_fast_optimized"
log = logging.getLogger("caer_fast.optimize")


class _Cache(dict):
    """Holds optimized forms on the model; copies and pickles of the model start without one."""

    def __deepcopy__(self, memo):
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


def _memory_format(model: nn.Module):
    dims = {m.weight.dim() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))}
    if dims == {4}:
        return torch.channels_last
    if dims == {5}:
        return torch.channels_last_3d
    return None  # no convs, or mixed: leave the layout alone


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _versions(model: nn.Module) -> tuple:
    # every in-place update (optimizer step, load_state_dict, BN statistics) bumps a tensor's version
    return tuple(t._version for t in model.state_dict(keep_vars=True).values())


class OptimizedModel(nn.Module):
    """What :func:`optimize` returns: call it like the model (``forward(face, context, return_details)``).

    ``info`` records the choices made: mode, layout, whether it compiled, fullgraph or not (and why),
    and the first call's time (which includes the compile).
    """

    def __init__(self, module: nn.Module, mode: str, compile: bool, device: torch.device,
                 compile_mode: Optional[str] = None, precision: str = "fp32"):
        super().__init__()
        self.module = module
        self.mode = mode
        self._device_type = device.type
        self._compile_mode = compile_mode
        self._call = None  # chosen on the first call (compilation is lazy, so are its failures)
        self._want_compile = compile
        self.info = {"mode": mode, "device": str(device), "compiled": False, "fullgraph": False,
                     "fallback_reason": None, "first_call_s": None,
                     "precision": None if precision == "auto" else precision}

    def _context(self):
        stack = contextlib.ExitStack()
        if self.mode == "inference":
            stack.enter_context(torch.inference_mode())
        if self._device_type == "cuda" and torch.cuda.is_bf16_supported():  # untested on the CPU machines
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        elif self._device_type == "cpu" and self.info["precision"] == "bf16":
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack

    def _first_call(self, *args, **kwargs):
        t = time.perf_counter()
        if not self._want_compile:
            self._call = self.module
            out = self._call(*args, **kwargs)
        else:
            out = None
            reasons = []
            for fullgraph in (True, False):
                compiled = torch.compile(self.module, fullgraph=fullgraph, mode=self._compile_mode)
                try:
                    out = compiled(*args, **kwargs)
                except Exception as exc:  # a graph break under fullgraph, or an inductor failure
                    reasons.append(f"fullgraph={fullgraph}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    torch._dynamo.reset()
                    continue
                self._call = compiled
                self.info.update(compiled=True, fullgraph=fullgraph)
                break
            if self._call is None:
                self._call = self.module
                out = self._call(*args, **kwargs)
            if reasons:
                self.info["fallback_reason"] = "; ".join(reasons)
                log.warning("optimize(%s): fell back (%s) because %s", self.mode,
                            "compiled with graph breaks" if self.info["compiled"] else "eager",
                            self.info["fallback_reason"])
        self.info["first_call_s"] = time.perf_counter() - t
        log.info("optimize(%s): first call %.1fs (%s)", self.mode, self.info["first_call_s"],
                 "compiled" if self.info["compiled"] else "eager")
        return out

    def forward(self, face: torch.Tensor, context: torch.Tensor, return_details: bool = False):
        if self.info["precision"] is None:  # precision="auto": measured once, on this call's inputs
            decision = choose_train_precision(self.module, face, context)
            self.info.update(precision=decision["precision"], precision_decision=decision)
            log.info("optimize(train): %s (%s)", decision["precision"], decision["reason"])
        with self._context():
            if self._call is None:
                return self._first_call(face, context, return_details=return_details)
            return self._call(face, context, return_details=return_details)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, compiled={self.info['compiled']}, fullgraph={self.info['fullgraph']}"


def _prepare_inference(model: nn.Module, fmt) -> nn.Module:
    copy_ = copy.deepcopy(model).eval()
    fold_batch_norm(copy_)
    if fmt is not None:
        copy_ = copy_.to(memory_format=fmt)
    return copy_.requires_grad_(False)


def optimize(model: nn.Module, mode: str = "inference", *, compile: Optional[bool] = None,
             channels_last: Optional[bool] = None, fold_bn: bool = True, precision: str = "auto",
             engine: Optional[str] = None):
    """Return the fastest callable form of ``model`` (a :class:`CAERNet` / :class:`CAERSNet`) for ``mode``.

    Same call signature and outputs as the model, ``return_details=True`` included.

    Args:
        model: one of our models. ``inference`` works on a copy; ``train`` uses the model itself
            (its parameters are the ones the optimizer updates; only their memory layout changes).
        mode: ``"train"`` or ``"inference"``.
        compile: ``torch.compile`` or not (default: yes; see the module docstring for the measurements).
        channels_last: put conv weights in channels_last / channels_last_3d. Default: for inference
            when eager (1.5x) or for the 3-D model compiled (1.45x: 1121 vs 1626 ms at batch 4, one
            thread); 2-D compiled graphs get their conv layouts from inductor's layout optimisation
            (forcing channels_last measured equal or 5-10 % slower). Not for training: in eager
            training, channels_last_3d conv3d weight gradients on this CPU were 100x further from
            float64 than the contiguous path's (1e-3 vs 1e-5 relative) for no measurable speed-up.
        fold_bn: fold batch norm into the convs (``inference`` only).
        precision: ``train`` on CPU: ``auto`` (bf16 autocast only when :func:`choose_train_precision`
            says so: native bf16, faster, converging), ``fp32`` or ``bf16`` (forced).
        engine: no longer taken here (the library's models sit below its serving layer): build an
            engine with :func:`caer_fast.serving.engines.build_engine` (``build_engine(model, "auto")``).

    Example:
        >>> fast = optimize(CAERSNet(), "inference", compile=False)
        >>> fast(torch.randn(2, 3, 96, 96), torch.randn(2, 3, 112, 112)).shape
        torch.Size([2, 7])
    """
    if mode not in MODES:
        raise ValueError(f"optimize: mode must be one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"optimize: precision must be one of {PRECISIONS}, got {precision!r}")
    if engine is not None:
        raise ValueError(f"optimize: engine={engine!r} moved to caer_fast.serving.engines.build_engine(model, "
                         f"{engine!r}) (same engines, same call)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    compile = True if compile is None else bool(compile)
    if channels_last is None:
        channels_last = mode == "inference" and (not compile or _memory_format(model) == torch.channels_last_3d)
    device = _device(model)
    if mode == "inference" or device.type != "cpu":
        precision = "fp32"
    key = (mode, compile, bool(channels_last), bool(fold_bn), precision)
    cache = model.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = _Cache()
        model.__dict__[_CACHE_ATTR] = cache  # a plain attribute: not a submodule, not in state_dict
    preload(device)
    fmt = _memory_format(model) if channels_last else None

    if key in cache:
        opt, versions = cache[key]
        if mode == "inference" and versions != _versions(model):
            # the source weights moved on: refresh the copy's values in place, keep the compiled graph
            fresh = _prepare_inference(model, fmt) if fold_bn else copy.deepcopy(model).eval()
            with torch.no_grad():
                for dst, src in zip(opt.module.state_dict(keep_vars=True).values(),
                                    fresh.state_dict(keep_vars=True).values()):
                    dst.copy_(src)
            cache[key] = (opt, _versions(model))
        return opt

    if mode == "inference":
        module = _prepare_inference(model, fmt) if fold_bn else copy.deepcopy(model).eval().requires_grad_(False)
        if not fold_bn and fmt is not None:
            module = module.to(memory_format=fmt)
    else:
        module = model.to(memory_format=fmt) if fmt is not None else model
    compile_mode = "reduce-overhead" if (device.type == "cuda" and mode == "inference") else None
    opt = OptimizedModel(module, mode, compile, device, compile_mode, precision)
    opt.info["memory_format"] = str(fmt).replace("torch.", "") if fmt is not None else "contiguous"
    opt.info["batch_norm_folded"] = mode == "inference" and fold_bn
    cache[key] = (opt, _versions(model) if mode == "inference" else None)
    return opt


# -- bf16 training on CPUs that have it --------------------------------------------------------------

MIN_BF16_SPEEDUP = 1.05  # bf16 must beat fp32 by this much per step to be worth its rounding
GUARD_STEPS = 6
WARMUP_STEPS = 2  # oneDNN builds its bf16 primitives on the first steps: timing them flipped the decision
DECISION_VERSION = 2  # bump when the measurement changes: older cached decisions are ignored


def decide_precision(native_bf16: bool, fp32_step_s: Optional[float] = None, bf16_step_s: Optional[float] = None,
                     loss_start: Optional[float] = None, loss_fp32: Optional[float] = None,
                     loss_bf16: Optional[float] = None) -> dict:
    """The rule: bf16 only when the CPU has it natively, its step is faster, and it converges like fp32
    (after ``GUARD_STEPS`` steps on one batch its loss fell and is within 5 % + 0.02 of fp32's)."""
    if not native_bf16:
        return {"precision": "fp32", "reason": "this CPU has no native bf16 (avx512_bf16 / amx_bf16): emulated bf16 "
                                               "is slower than fp32"}
    if fp32_step_s is None or bf16_step_s is None:
        return {"precision": "fp32", "reason": "bf16 step not measured"}
    speedup = fp32_step_s / bf16_step_s
    if speedup < MIN_BF16_SPEEDUP:
        return {"precision": "fp32", "reason": f"bf16 step not faster ({speedup:.2f}x fp32)", "speedup": speedup}
    finite = all(v is not None and v == v and abs(v) != float("inf") for v in (loss_start, loss_fp32, loss_bf16))
    if not finite or not loss_bf16 < loss_start or loss_bf16 > loss_fp32 * 1.05 + 0.02:
        return {"precision": "fp32", "reason": f"convergence guard: bf16 loss {loss_bf16} after {GUARD_STEPS} steps "
                                               f"vs fp32 {loss_fp32} (start {loss_start})", "speedup": speedup}
    return {"precision": "bf16", "reason": f"native bf16, step {speedup:.2f}x fp32, converges like fp32",
            "speedup": speedup}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def precision_cache_key(model: nn.Module, face: torch.Tensor, context: torch.Tensor) -> str:
    """What the decision depends on: this machine (CPU model, vector flags, torch version, threads) and
    the model's architecture and input shapes — not its weights, so later epochs and resumes reuse it."""
    try:
        caps = sorted(k for k, v in torch.cpu.get_capabilities().items() if v is True)
    except Exception:
        caps = []
    h = hashlib.sha256(repr((DECISION_VERSION, _cpu_name(), caps, torch.__version__, torch.get_num_threads(),
                             type(model).__qualname__, getattr(model, "frames", None),
                             [(k, tuple(v.shape)) for k, v in model.state_dict().items()],
                             tuple(face.shape), tuple(context.shape))).encode())
    return h.hexdigest()[:24]


def _precision_cache_path(key: str):
    return cache_dir() / "precision" / f"{key}.json"


def _read_cached(key: str) -> Optional[dict]:
    try:
        got = json.loads(_precision_cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) and got.get("precision") in ("fp32", "bf16") else None


def _write_cached(key: str, decision: dict) -> None:
    path = _precision_cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(decision, indent=1))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as exc:  # a read-only home: the decision still holds for this process
        log.warning("precision decision not cached (%s): %s", path, exc)


def measure_train_precision(model: nn.Module, face: torch.Tensor, context: torch.Tensor,
                            warmup: int = WARMUP_STEPS, steps: int = GUARD_STEPS, timer=time.perf_counter) -> dict:
    """Train an fp32 and a bf16-autocast copy of ``model`` side by side on ``face`` / ``context`` (fixed
    random labels, SGD), alternating one step of each so both see the same machine load; the first
    ``warmup`` steps are not timed. Returns the median step times and the losses for the guard."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    runs = {}
    for prec in ("fp32", "bf16"):
        m = copy.deepcopy(model).train()
        runs[prec] = dict(model=m, opt=torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
                          ctx=(lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if prec == "bf16"
                          else contextlib.nullcontext, times=[], losses=[])
    target = None
    for step in range(warmup + steps):
        for prec, r in runs.items():
            t = timer()
            with r["ctx"]():
                logits = r["model"](face, context)
            if target is None:
                target = torch.randint(0, logits.shape[-1], (face.shape[0],), generator=g)
            loss = F.cross_entropy(logits.float(), target)
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
            elapsed = timer() - t
            if step >= warmup:
                r["times"].append(elapsed)
            r["losses"].append(float(loss.detach()))
    out = {}
    for prec, r in runs.items():
        with torch.no_grad(), r["ctx"]():
            final = float(F.cross_entropy(r["model"](face, context).float(), target))
        times = sorted(r["times"])
        out[prec] = {"step_s": times[len(times) // 2], "times": r["times"], "loss_start": r["losses"][0],
                     "loss_final": final}
    return out


def choose_train_precision(model: nn.Module, face: torch.Tensor, context: torch.Tensor,
                           native_bf16: Optional[bool] = None, cache: bool = True) -> dict:
    """Should bf16 autocast train ``model`` on this CPU? (:func:`decide_precision` on
    :func:`measure_train_precision`'s medians, after warm-up.)

    Works on copies (the model's weights and BN statistics are untouched). The decision is cached per
    machine and model (:func:`precision_cache_key`, under ``$CAER_FAST_CACHE_DIR/precision``), so every
    later process on this machine trains this model in the same precision; ``source`` says whether it
    was ``measured`` now or read from the ``cache``. Nothing is measured on CPUs without native bf16."""
    native = devices.has_native_bf16() if native_bf16 is None else bool(native_bf16)
    if not native or face.device.type != "cpu":
        return dict(decide_precision(native and face.device.type == "cpu"), source="cpu flags")
    key = precision_cache_key(model, face, context) if cache else None
    if key is not None:
        cached = _read_cached(key)
        if cached is not None:
            return dict(cached, source="cache", cache_key=key)
    m = measure_train_precision(model, face, context)
    out = decide_precision(True, m["fp32"]["step_s"], m["bf16"]["step_s"], m["fp32"]["loss_start"],
                           m["fp32"]["loss_final"], m["bf16"]["loss_final"])
    out.update(fp32_step_s=m["fp32"]["step_s"], bf16_step_s=m["bf16"]["step_s"], loss_start=m["fp32"]["loss_start"],
               loss_fp32=m["fp32"]["loss_final"], loss_bf16=m["bf16"]["loss_final"], warmup_steps=WARMUP_STEPS,
               timed_steps=GUARD_STEPS, cpu=_cpu_name(), threads=torch.get_num_threads())
    if key is not None:
        _write_cached(key, out)
        out["cache_key"] = key
    out["source"] = "measured"
    return out
