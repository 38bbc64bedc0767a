"""``auto``: measure the fp32 candidates on this machine, reject any whose outputs differ from the eager
model, keep the fastest, and cache the decision (``decision-<candidates>.json`` in the cache entry) so a
later start reads it back instead of measuring."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import threading
import time
from typing import Callable, List, Optional, Tuple

import torch

from ...devices import cpu_flags
from ...models.caer_net import CAERNet
from .base import (BuildContext, Engine, EngineError, batch_limit, compare, fp32_engine_names, log, random_inputs,
                   register_engine, release_memory, run_in_slices, sample_input_bytes)
from .cache import library_versions, write_json_atomic

# what `auto` measures by default (openvino where it is installed): the compiled engine pays a compile in
# every new process (no on-disk artefact yet), which breaks the "first answer within a second" promise, so
# it is measured only when asked
AUTO_CANDIDATES = ("onnxruntime", "openvino", "eager")


def auto_candidates() -> Tuple[str, ...]:
    """What ``auto`` measures by default here: ``AUTO_CANDIDATES``, less openvino where it is not installed."""
    return tuple(n for n in AUTO_CANDIDATES if n != "openvino" or importlib.util.find_spec("openvino") is not None)


# auto's measurement at its peak, over the process before it started: full-size CAER-Net at b1 and b4, int8
# included, +543 MiB (tools/int8_memory.py --engine auto); CAER-Net-S at (1, 4) / (1, 8) / (1, 32), +163 / +166 /
# +232 MiB here, +192 MiB at (1, 4) on CI's machine (bench/RESULTS.md "auto's memory estimate"): the fixed part
# varies by CPU, so 32× the largest batch's input bytes + 256 MiB
MEASURE_INPUT_FACTOR, MEASURE_FIXED_BYTES = 32, 256 * 2**20


def measured_batch_sizes(face_shape, context_shape, batch_sizes) -> List[int]:
    """The batch sizes ``auto`` times: the smallest of ``batch_sizes`` and the largest, capped at the batch
    one engine call runs at once (:func:`~caer_fast.serving.engines.base.batch_limit`: timing eager on 16
    full-size clips, predict --people all's batches, cost ~1 GB more at the cold start's peak)."""
    return sorted({int(batch_sizes[0]), min(int(batch_sizes[-1]), batch_limit(face_shape, context_shape))})


def measure_memory_estimate(face_shape, context_shape, batch_sizes) -> int:
    """Bytes ``auto``'s measurement may add to the process (a server reserves them in its memory budget)."""
    batch = measured_batch_sizes(face_shape, context_shape, batch_sizes)[-1]
    return int(MEASURE_INPUT_FACTOR * sample_input_bytes(face_shape, context_shape) * batch + MEASURE_FIXED_BYTES)


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


def candidate_names(ctx: BuildContext):
    """What ``auto`` measures for ``ctx``: ``candidates`` (default :func:`auto_candidates`), plus ``int8``
    for the video model when calibration data is at hand (the image model's int8 compiles in every process)."""
    names = list(ctx.options.get("candidates") or auto_candidates())
    for n in names:
        if n not in fp32_engine_names():
            raise EngineError(f"auto: {n!r} is not an fp32 engine to measure ({', '.join(fp32_engine_names())})")
    if ctx.options.get("calibration") is not None and isinstance(ctx.model, CAERNet) and \
            importlib.util.find_spec("nncf") is not None and importlib.util.find_spec("openvino") is not None:
        names.append("int8")
    return names


def decision_path(ctx: BuildContext, names):
    return ctx.dir / f"decision-{'-'.join(names)}.json" if ctx.dir is not None else None


def cached_decision(ctx: BuildContext):
    """The cached ``auto`` decision for ``ctx`` (a dict), or None: a build would measure."""
    names = candidate_names(ctx)
    return _read_decision(ctx, decision_path(ctx, names), names)


def pick(results: dict) -> str:
    """The fastest candidate that passed its check (fp32: :func:`compare`; int8: its accuracy guard);
    ``eager`` when none did. ``results``: name → {"check": {"ok": …}, "score": per-sample seconds}."""
    ok = {n: r["score"] for n, r in results.items() if r.get("check", {}).get("ok") and "score" in r}
    return min(ok, key=ok.get) if ok else "eager"


@register_engine("auto", fp32=False, description="measure the fp32 candidates (and int8 with calibration data) "
                                                 "here, keep the fastest correct one")
def build_auto(ctx: BuildContext) -> Engine:
    t0 = time.perf_counter()
    names = candidate_names(ctx)
    decision_file = decision_path(ctx, names)
    decision = _read_decision(ctx, decision_file, names)
    if decision is not None:
        chosen = decision["chosen"]
        eng = ctx.build(chosen)
        eng.info.update(decision=decision, decision_cached=True)
        return eng

    sizes = measured_batch_sizes(ctx.face_shape, ctx.context_shape, ctx.batch_sizes)
    ctx.say(f"engine: measuring {', '.join(names)} at batch {sizes[0]} and {sizes[-1]} "
            f"({ctx.threads} threads; once per model and machine) …")
    results = {}
    reference, best_engine = ctx.build("eager"), None
    # eager first, then one candidate alive at a time: only the numbers are kept, the winner is rebuilt
    # at the end from the cache (the cold build's peak is then one engine, not all of them)
    # with BackgroundAuto: one candidate's build, check and timing at a time between eager's answers
    turn = ctx.options.get("turn") or contextlib.nullcontext()
    for n in ["eager"] + [n for n in names if n != "eager"]:
        if n not in names:
            continue
        with turn:
            try:
                eng = reference if n == "eager" else ctx.build(n)
            except Exception as exc:  # a missing package, a failed export, a failed int8 guard: not a candidate
                results[n] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                release_memory()
                continue
            if n == "eager":
                cmp = {"max_abs": 0.0, "max_abs_details": 0.0, "agreement": 1.0, "ok": True}
            elif n == "int8":
                cmp = dict(eng.info["guard"])  # int8 is not fp32: its check is the guard on held-out real clips
            else:
                cmp = compare(reference, eng, ctx.face_shape, ctx.context_shape)
            r = {"check": cmp}
            if cmp["ok"]:
                r["seconds"] = {str(s): time_engine(eng, ctx.face_shape, ctx.context_shape, s) for s in sizes}
                r["score"] = sum(v / int(s) for s, v in r["seconds"].items())  # per-sample seconds, summed
        results[n] = r
        if n != "eager" and ctx.dir is None and pick(results) == n:
            best_engine = eng  # no cache to rebuild it from cheaply: keep the best so far
        if n != "eager":
            del eng
            release_memory()
    chosen = pick(results)
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
    kept = best_engine if best_engine is not None and best_engine.name == chosen else None
    with turn:
        eng = reference if chosen == "eager" else kept if kept is not None else ctx.build(chosen)  # cache entry
    eng.info.update(decision=decision, decision_cached=False, measure_s=round(time.perf_counter() - t0, 3))
    return eng


class BackgroundAuto(Engine):
    """``auto`` without the wait: answers with the eager model at once, measures the candidates in a thread
    (started after the first answer, so it does not slow that one down) and then swaps to the chosen engine.

    ``name`` is ``"eager (auto measuring)"`` until the swap, then the chosen engine's name; ``info`` is the
    running engine's, plus ``background`` (state, calls answered by eager, the error if measuring failed:
    then eager keeps answering; the reason it never started). Every answer is the eager model's or a
    candidate's that passed the fp32 check (int8: its accuracy guard). The thread is not a daemon: a short
    ``predict`` prints its answer, then finishes the measurement and writes the decision before the process
    exits, so the next start reads it.

    ``admit`` (set by a server before the first call): called in the measuring thread with
    ``memory_estimate`` bytes; it returns once they are reserved (waiting while requests hold the memory)
    and returns the release, or raises ``MemoryError`` when they can never fit: eager then keeps answering.
    """

    MEASURING = "eager (auto measuring)"

    def __init__(self, eager: Engine, measure: Callable[[], Engine], say: Callable[[str], None] = log.info,
                 memory_estimate: int = 0, turn: Optional[threading.Lock] = None, slice_batch: int = 0):
        super().__init__(None)
        self._slice = int(slice_batch)  # while measuring, eager runs bigger batches in slices of this many
        self._turn = turn or threading.Lock()  # held by eager's calls while measuring and by each candidate
        self.memory_estimate = int(memory_estimate)
        self.admit: Optional[Callable[[int], Callable[[], None]]] = None
        self._current: Engine = eager
        self._measure, self._say = measure, say
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._state = {"state": "waiting for the first call", "eager_calls": 0}
        self.info = dict(eager.info, engine=self.MEASURING, background=self._state)

    @property
    def name(self) -> str:  # type: ignore[override]
        if "_lock" not in self.__dict__:  # during Engine.__init__
            return self.MEASURING
        with self._lock:
            state = self._state["state"]
            return self._current.name if state == "done" else "eager" if state == "not measuring" else self.MEASURING

    @name.setter
    def name(self, value) -> None:  # Engine.__init__ assigns it; the property decides
        pass

    def forward(self, face, context, return_details: bool = False):
        with self._lock:
            current, measuring = self._current, self._state["state"] != "done"
            if measuring:
                self._state["eager_calls"] += 1
        if measuring:
            out = self._eager_in_turns(current, face, context, return_details)
        else:
            out = current(face, context, return_details=return_details)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._state["state"] = "measuring"
                    self._thread = threading.Thread(target=self._run, name="caer_fast-auto-measure", daemon=False)
                    self._thread.start()
        return out

    def _eager_in_turns(self, eager, face, context, return_details):
        """Eager while measuring: slices of at most ``slice_batch`` inputs (eager on 16 full-size clips holds
        ~1 GB of activations), each in its turn with the measured candidates."""
        def run_in_turn(f, c):
            with self._turn:
                return eager.run(f, c)

        logits, attention, weights = run_in_slices(run_in_turn, face, context, self._slice)
        if return_details:
            return logits, {"attention": attention, "fusion_weights": weights}
        return logits

    @property
    def state(self) -> dict:
        """The measurement's state (a copy): state, eager_calls, memory_bytes, error / reason."""
        with self._lock:
            return dict(self._state)

    def _run(self) -> None:
        release = None
        if self.admit is not None:
            with self._lock:
                self._state.update(state="waiting for memory", memory_bytes=self.memory_estimate)
            try:
                release = self.admit(self.memory_estimate)
            except MemoryError as exc:
                with self._lock:
                    self._state.update(state="not measuring", reason=f"the measurement does not fit: {exc}")
                self._say(f"engine: not measuring the engines: it needs about {self.memory_estimate / 2**20:.0f} MiB "
                          f"({exc}); staying with eager (a larger --memory-budget-mb lets it measure)")
                return
            except Exception as exc:  # the server stopped while it waited
                with self._lock:
                    self._state.update(state="not measuring", reason=f"{type(exc).__name__}: {exc}"[:300])
                return
            with self._lock:
                self._state["state"] = "measuring"
        t = time.perf_counter()
        try:
            eng = self._measure()
        except Exception as exc:  # eager keeps answering; the next start measures again
            with self._lock:
                self._state.update(state="failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            self._say(f"engine: measuring failed ({type(exc).__name__}: {exc}); staying with eager")
            return
        finally:
            if release is not None:
                release()
        with self._lock:
            self._current = eng
            self._state.update(state="done", measure_s=round(time.perf_counter() - t, 2))
            self.info = dict(eng.info, background=self._state)
        self._say(f"engine: switched to {eng.name} (measured in the background, decision cached for the next start)")

    def wait(self, timeout: Optional[float] = None) -> Engine:
        """Wait for the measurement (if started); the engine answering now."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._current
