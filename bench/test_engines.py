"""Inference engines side by side, same weights, one process: CAER-S (image) and CAER-Net (video).

    pytest bench/test_engines.py --benchmark-only -s -p no:cacheprovider    # or: python bench/test_engines.py

Contenders: the community CAER-S model (eager, image only), ours eager, ``caer_fast.optimize`` (torch.compile),
``caer_fast.quantize_int8`` (PT2E int8, image only), ONNX Runtime on our export (fp32, and its own static int8
quantisation of the same file), OpenVINO (fp32, and int8 through NNCF: optional, skipped with the reason when
the package is absent) and ``auto`` (caer_fast.serving.engines' measured choice: which engine it picks).

Every contender is first checked against the reference (ours eager, fp32) on fresh random inputs at batch 1
and 3: max |Δlogit|, max |Δλ| (fusion weights), argmax agreement, shown as columns, so a wrong engine is visible,
not just a fast one. Then the median time per call after a warm-up (the first call, which includes any
compile, is its own column). The CPU's flags, the matmul rate at each thread count and the load average are
printed in the same run.

Knobs (environment): CAER_FAST_BENCH_THREADS (default "1,2"), CAER_FAST_BENCH_IMAGE_BATCHES ("1,32"),
CAER_FAST_BENCH_VIDEO_BATCHES ("1,4": a batch of 32 clips is 512 frames, about a minute per eager call here),
CAER_FAST_BENCH_ENGINES (a comma list to run only some contenders).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from caer_fast.models import CAERNet, CAERSNet
from caer_fast.serving import engines
from caer_fast.testing.community_model import CommunityCAERSNet, randomize_bn_
from caer_fast.testing.timing import matmul_gflops, median_time


def _env_list(name, default):
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


THREADS = [int(x) for x in _env_list("CAER_FAST_BENCH_THREADS", "1,2")]
BATCHES = {"caers": [int(x) for x in _env_list("CAER_FAST_BENCH_IMAGE_BATCHES", "1,32")],
           "caer-video": [int(x) for x in _env_list("CAER_FAST_BENCH_VIDEO_BATCHES", "1,4")]}
ONLY = set(_env_list("CAER_FAST_BENCH_ENGINES", ""))
SHAPES = {"caers": ((3, 96, 96), (3, 112, 112)), "caer-video": ((3, 16, 96, 96), (3, 16, 112, 112))}


def _models(case):
    torch.manual_seed(0)
    if case == "caers":
        community = randomize_bn_(CommunityCAERSNet(), torch.Generator().manual_seed(1)).eval()
        ours = CAERSNet()
        ours.load_state_dict(community.state_dict())
        return community, ours.eval()
    return None, randomize_bn_(CAERNet(frames=16), torch.Generator().manual_seed(1)).eval()


def _inputs(case, batch, seed):
    fs, cs = SHAPES[case]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *fs, generator=g), torch.randn(batch, *cs, generator=g)


def _calibration(case, n=4, batch=4):
    return [_inputs(case, batch, 1000 + i) for i in range(n)]


class _Skip(Exception):
    pass


# -- contenders: each returns fn(face, context) -> (logits, attention or None, weights or None) ----------------

def _torch_fn(model, details=True):
    def fn(face, context):
        with torch.inference_mode():
            if not details:
                return model(face, context), None, None
            logits, d = model(face, context, return_details=True)
        return logits, d["attention"], d["fusion_weights"]
    return fn


def _ort_session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def fn(face, context):
        out = s.run(None, {"face": face.numpy(), "context": context.numpy()})
        return tuple(torch.from_numpy(o) for o in out)
    return fn


def _ort_int8_file(case, onnx_path, work):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter([{"face": f.numpy(), "context": c.numpy()} for f, c in _calibration(case)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)
    pre, out = work / f"{case}-pre.onnx", work / f"{case}-ort-int8.onnx"
    if not out.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
            # QOperator (QLinearConv): measured faster than QDQ here; 7-bit activations without VNNI
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=not engines_has_vnni(), op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return out


def engines_has_vnni():
    from caer_fast.models.quantize import has_vnni

    return has_vnni()


def _openvino(onnx_path, threads, case, int8):
    try:
        import openvino as ov
    except ImportError as exc:
        raise _Skip(f"openvino not installed (optional: pip install openvino) [{exc}]")
    core = ov.Core()
    model = core.read_model(str(onnx_path))
    if int8:
        try:
            import nncf
        except ImportError as exc:
            raise _Skip(f"nncf not installed (optional: pip install nncf) [{type(exc).__name__}]")
        data = [{"face": f.numpy(), "context": c.numpy()} for f, c in _calibration(case)]
        model = nncf.quantize(model, nncf.Dataset(data), subset_size=len(data))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    outs = compiled.outputs

    def fn(face, context):
        r = request.infer({"face": face.numpy(), "context": context.numpy()})
        return tuple(torch.from_numpy(np.array(r[o])) for o in outs)
    return fn


def contenders(case, community, ours, threads, work):
    """name -> zero-argument builder of fn; builders raise _Skip(reason) where a contender cannot run."""
    fs, cs = SHAPES[case]
    onnx_path = work / f"{case}.onnx"

    def export():
        if not onnx_path.is_file():
            from caer_fast.serving.onnx import export_model_onnx

            export_model_onnx(ours, fs, cs, onnx_path)
        return onnx_path

    def int8():
        if case != "caers":
            raise _Skip("quantize_int8 supports the image model only (the x86 PT2E quantizer has no Conv3d)")
        from caer_fast.models.quantize import quantize_int8

        return _torch_fn(quantize_int8(ours, _calibration(case)))

    def optimize():
        from caer_fast import optimize as opt

        return _torch_fn(opt(ours, "inference"))

    def auto():
        kw = dict(face_shape=fs, context_shape=cs, batch_sizes=(1, max(BATCHES[case])), threads=threads,
                  cache_dir=work / "cache")
        eng = engines.build_engine(ours, "auto", **kw)
        # a second start on this machine: read the decision and the optimised graph back, answer batch 1
        t = time.perf_counter()
        warm = engines.build_engine(ours, "auto", **kw)
        built = time.perf_counter() - t
        warm(*_inputs(case, 1, 5))
        first = time.perf_counter() - t
        return _torch_fn(eng), f"{eng.name}; warm start {built:.2f} s + first answer = {first:.2f} s"

    out = {}
    if community is not None:
        out["community-eager"] = lambda: _torch_fn(community, details=False)
    out["ours-eager"] = lambda: _torch_fn(ours)
    out["optimize"] = optimize
    out["quantize_int8"] = int8
    out["onnxruntime"] = lambda: _ort_session(export(), threads)
    out["onnxruntime-int8"] = lambda: _ort_session(_ort_int8_file(case, export(), work), threads)
    out["openvino"] = lambda: _openvino(export(), threads, case, int8=False)
    out["openvino-int8"] = lambda: _openvino(export(), threads, case, int8=True)
    out["auto"] = auto
    return {k: v for k, v in out.items() if not ONLY or k in ONLY}


def check(ref, fn, case):
    """max |Δlogit|, max |Δλ|, argmax agreement against the reference on fresh inputs at batch 1 and 3."""
    dl, dw, agree, n = 0.0, None, 0, 0
    for b, seed in ((1, 7), (3, 8)):
        face, context = _inputs(case, b, seed)
        rl, _, rw = ref(face, context)
        gl, _, gw = fn(face, context)
        dl = max(dl, float((rl - gl).abs().max()))
        if gw is not None:
            dw = max(dw or 0.0, float((rw - gw).abs().max()))
        agree += int((rl.argmax(-1) == gl.argmax(-1)).sum())
        n += b
    return dl, dw, agree / n


def run_case(case, threads, work, lines):
    torch.set_num_threads(threads)
    community, ours = _models(case)
    ref = _torch_fn(ours)
    rows, base = [], {}
    for name, build in contenders(case, community, ours, threads, work).items():
        t = time.perf_counter()
        try:
            fn = build()
        except _Skip as exc:
            rows.append((name, f"skipped: {exc}"))
            continue
        except Exception as exc:  # a contender that fails to build is a result too
            rows.append((name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
            continue
        picked = ""
        if isinstance(fn, tuple):
            fn, picked = fn
        build_s = time.perf_counter() - t
        try:
            dl, dw, agree = check(ref, fn, case)
        except Exception as exc:
            rows.append((name, f"failed at check: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
            continue
        per_batch = {}
        for b in BATCHES[case]:
            face, context = _inputs(case, b, 99)
            t = time.perf_counter()
            fn(face, context)  # warm-up (a compiled contender compiles this batch-size range here)
            first = time.perf_counter() - t
            rounds = 5 if (case == "caers" and b == 1) else 3
            per_batch[b] = (median_time(fn, face, context, rounds), first)
            if name == "ours-eager":
                base[b] = per_batch[b][0]
        rows.append((name, dl, dw, agree, build_s, per_batch, picked))
        print(f"[{case} t{threads}] {name}: dlogit {dl:.2e} dλ {dw} agree {agree:.0%} build {build_s:.1f}s "
              + " ".join(f"b{b} {m * 1e3:.1f} ms (1st {f:.1f}s)" for b, (m, f) in per_batch.items()),
              file=sys.stderr, flush=True)  # progress: a long run shows what it has
    lines.append(f"\n{case}, {threads} thread(s), load average {os.getloadavg()[0]:.1f}; reference: ours-eager fp32")
    head = f"  {'engine':<18} {'max|dlogit|':>11} {'max|dλ|':>9} {'agree':>6} {'build s':>8}"
    for b in BATCHES[case]:
        head += f" | b{b:<3} {'ms':>8} {'x eager':>7} {'1st s':>6}"
    lines.append(head)
    for r in rows:
        if len(r) == 2:
            lines.append(f"  {r[0]:<18} {r[1]}")
            continue
        name, dl, dw, agree, build_s, per_batch, picked = r
        s = f"  {name:<18} {dl:11.2e} {('-' if dw is None else f'{dw:9.2e}'):>9} {agree:6.0%} {build_s:8.1f}"
        for b in BATCHES[case]:
            m, first = per_batch[b]
            s += f" | {'':4} {m * 1e3:8.1f} {base.get(b, m) / m:6.2f}x {first:6.1f}"
        if picked:
            s += f"   (picked {picked})"
        lines.append(s)


def run(cases=("caers", "caer-video")):
    lines = [f"CPU flags (torch.cpu.get_capabilities): {' '.join(engines.cpu_flags())}"]
    for t in THREADS:
        torch.set_num_threads(t)
        lines.append(f"fp32 matmul 2048², {t} thread(s): {matmul_gflops():.0f} GFLOP/s")
    lines.append(f"torch {torch.__version__}; {engines._versions()}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="caer_fast_bench_engines_") as d:
        for case in cases:
            for t in THREADS:
                run_case(case, t, Path(d), lines)
    return "\n".join(lines)


def test_engines_side_by_side(benchmark, capsys):
    # one pedantic round: the contenders are timed inside run(); the fixture only puts the table under
    # `pytest bench/ --benchmark-only` (= `make bench`)
    text = benchmark.pedantic(run, rounds=1, iterations=1)
    with capsys.disabled():
        print("\n" + text)
    assert "ours-eager" in text
    benchmark.extra_info["table"] = text


if __name__ == "__main__":
    print(run(tuple(sys.argv[1:]) or ("caers", "caer-video")))
