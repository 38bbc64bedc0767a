"""``auto``: measure the fp32 candidates on this machine, reject any whose outputs differ from the eager
model, keep the fastest, and cache the decision (``decision-<candidates>.json`` in the cache entry) so a
later start reads it back instead of measuring."""
from __future__ import annotations

import importlib.util
import json
import time
from typing import Callable, Tuple

import torch

from ...devices import cpu_flags
from .base import BuildContext, Engine, EngineError, compare, fp32_engine_names, log, random_inputs, register_engine
from .cache import library_versions, write_json_atomic

# what `auto` measures by default (openvino where it is installed): the compiled engine pays a compile in
# every new process (no on-disk artefact yet), which breaks the "first answer within a second" promise, so
# it is measured only when asked
AUTO_CANDIDATES = ("onnxruntime", "openvino", "eager")


def auto_candidates() -> Tuple[str, ...]:
    """What ``auto`` measures by default here: ``AUTO_CANDIDATES``, less openvino where it is not installed."""
    return tuple(n for n in AUTO_CANDIDATES if n != "openvino" or importlib.util.find_spec("openvino") is not None)


def time_engine(engine: Callable, face_shape, context_shape, batch: int, repeats: int = 3,
                min_time: float = 0.0) -> float:
    """Median seconds per call at ``batch`` after one warm-up call."""
    face, context = random_inputs(face_shape, context_shape, batch, 123)
    with torch.inference_mode():
        engine(face, context, return_details=True)
        times = []
        start = time.perf_counter()
        while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50):
            t = time.perf_counter()
            engine(face, context, return_details=True)
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def _read_decision(ctx, path, names):
    if path is None or not ctx.manifest.check(path):
        return None
    try:
        decision = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable engine decision %s (%s)", path, exc)
        return None
    if not isinstance(decision, dict) or decision.get("chosen") not in names or decision.get("model") != ctx.model_digest:
        ctx.warn(f"engine cache: {path} is not a decision for this model: measuring again")
        return None
    return decision


@register_engine("auto", fp32=False, description="measure the fp32 candidates here, keep the fastest correct one")
def build_auto(ctx: BuildContext) -> Engine:
    t0 = time.perf_counter()
    names = list(ctx.options.get("candidates") or auto_candidates())
    for n in names:
        if n not in fp32_engine_names():
            raise EngineError(f"auto: {n!r} is not an fp32 engine to measure ({', '.join(fp32_engine_names())})")
    reference = ctx.build("eager")
    decision_file = ctx.dir / f"decision-{'-'.join(names)}.json" if ctx.dir is not None else None
    decision = _read_decision(ctx, decision_file, names)
    if decision is not None:
        chosen = decision["chosen"]
        eng = reference if chosen == "eager" else ctx.build(chosen)
        eng.info.update(decision=decision, decision_cached=True)
        return eng

    sizes = sorted({ctx.batch_sizes[0], ctx.batch_sizes[-1]})
    ctx.say(f"engine: measuring {', '.join(names)} at batch {sizes[0]} and {sizes[-1]} "
            f"({ctx.threads} threads; once per model and machine) …")
    results = {}
    best, best_engine = None, None  # only the fastest so far stays in memory
    for n in names:
        try:
            eng = reference if n == "eager" else ctx.build(n)
        except Exception as exc:  # a missing package, a failed export: not a candidate here
            results[n] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        cmp = {"max_abs": 0.0, "max_abs_details": 0.0, "agreement": 1.0, "ok": True} if n == "eager" else \
            compare(reference, eng, ctx.face_shape, ctx.context_shape)
        r = {"check": cmp}
        if cmp["ok"]:
            r["seconds"] = {str(s): time_engine(eng, ctx.face_shape, ctx.context_shape, s) for s in sizes}
            r["score"] = sum(v / int(s) for s, v in r["seconds"].items())  # per-sample seconds, summed
            if best is None or r["score"] < results[best]["score"]:
                best, best_engine = n, eng
        del eng
        results[n] = r
    chosen = best or "eager"
    decision = {"chosen": chosen, "model": ctx.model_digest, "candidates": results, "batch_sizes": sizes, "threads": ctx.threads,
                "cpu_flags": cpu_flags(), "versions": library_versions(),
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if decision_file is not None:
        try:
            write_json_atomic(decision_file, decision)
            ctx.manifest.record(decision_file)
        except OSError as exc:
            log.warning("could not write the engine decision %s (%s); the next start measures again", decision_file, exc)
    ctx.say("engine: " + "; ".join(
        f"{n} {'rejected (outputs differ)' if not r.get('check', {}).get('ok', False) and 'error' not in r else ''}"
        f"{r['error'] if 'error' in r else ''}"
        f"{', '.join(f'b{s} {v * 1e3:.0f} ms' for s, v in r.get('seconds', {}).items())}"
        for n, r in results.items()) + f" → {chosen}")
    eng = best_engine if best_engine is not None else reference
    eng.info.update(decision=decision, decision_cached=False, measure_s=round(time.perf_counter() - t0, 3))
    return eng
