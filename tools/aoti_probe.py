"""AOTInductor vs ONNX Runtime on our models, one process (bench/RESULTS.md, "AOTInductor as a third candidate").

    python tools/aoti_probe.py caers     # CAER-S, batch 1 and 32
    python tools/aoti_probe.py video     # CAER-Net, batch 1 and 4

Exports our inference copy (BN folded, channels-last) with a dynamic batch, compiles it with
``aoti_compile_and_package`` (freezing on), loads the package, and times it beside ONNX Runtime on our
ONNX export and the eager model, after checking both against the eager logits. 2 threads.
"""
import os
import sys
import tempfile
import time

import torch
from torch._inductor import aoti_compile_and_package, aoti_load_package

from caer_fast.models.caer_net import CAERNet, CAERSNet, WithDetails
from caer_fast.models.optimize import _memory_format, _prepare_inference
from caer_fast.serving.engines import OnnxRuntimeEngine, default_shapes
from caer_fast.serving.onnx import export_model_onnx
from caer_fast.testing.timing import median_time


def _median_ms(fn, face, context, n):
    fn(face, context)  # warm-up
    return median_time(fn, face, context, n) * 1e3


def main(which: str) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = (CAERSNet() if which == "caers" else CAERNet()).eval()
    face_shape, context_shape = default_shapes(model)
    sizes = (1, 32) if which == "caers" else (1, 4)
    wrapped = WithDetails(_prepare_inference(model, _memory_format(model))).eval()  # details as plain outputs
    batch = torch.export.Dim("batch", min=1, max=256)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with torch.no_grad():
            program = torch.export.export(wrapped, (torch.randn(2, *face_shape), torch.randn(2, *context_shape)),
                                          dynamic_shapes=({0: batch}, {0: batch}))
        package = aoti_compile_and_package(program, package_path=os.path.join(tmp, "model.pt2"),
                                           inductor_configs={"freezing": True})
        print(f"export + AOTInductor compile {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        runner = aoti_load_package(package)
        print(f"package load {time.perf_counter() - t:.3f} s")
        export_model_onnx(model, face_shape, context_shape, os.path.join(tmp, "model.onnx"))
        ort = OnnxRuntimeEngine(os.path.join(tmp, "model.onnx"), 2)
        for b in sizes:
            face, context = torch.randn(b, *face_shape), torch.randn(b, *context_shape)
            with torch.inference_mode():
                want = model(face, context)
                got_aoti = runner(face, context)[0]
            got_ort = ort.run(face, context)[0]
            print(f"b{b} max |Δlogit| AOTI {float((got_aoti - want).abs().max()):.2e}, "
                  f"ORT {float((got_ort - want).abs().max()):.2e}")
            n = 20 if b == 1 else 5
            with torch.inference_mode():
                for _ in range(2):
                    print(f"b{b} ms: AOTI {_median_ms(runner, face, context, n):.1f}, "
                          f"ORT {_median_ms(ort.run, face, context, n):.1f}, "
                          f"eager {_median_ms(model, face, context, max(3, n // 4)):.1f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("caers", "video"):
        sys.exit(__doc__)
    main(sys.argv[1])
