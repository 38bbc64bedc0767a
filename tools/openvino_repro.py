"""OpenVINO 2026.4 computes ``BatchNorm1d(x.flatten(2).mean(-1))`` wrongly at batch >= 2 (reduced reproducer).

    python tools/openvino_repro.py          # needs openvino; exits 1 when the bug shows

This is what broke CAER-Net(-S) under OpenVINO (fusion weights off by about 3e-2, logits by about 6e-2, at
batch >= 2 only, also with f32 inference precision forced): the face vector was the mean over positions of
the encoder's map (``flatten(2).mean(-1)``), and the attention pooling flattened its input the same way,
both going into the fusion net's BatchNorm1d. The exported graph is Shape/Reshape (dynamic batch) ->
ReduceMean(axis -1) -> BatchNormalization; batch 1 is right, batch 2 and 3 are wrong. ``mean(dim=(2, 3))``
(no Reshape) is right, and so is BatchNorm1d on an N×C input; ONNX Runtime is right on the same file.
Our export now pools over the position axes (caer_fast/models/caer_net.py, the attention_pool reference
under ONNX export), so the ``openvino`` engine is correct; this script keeps the reduced bug visible.
"""
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


class Pool(nn.Module):
    def __init__(self, channels=8, reshape=True):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.reshape = reshape
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.bn(x.flatten(2).mean(-1) if self.reshape else x.mean(dim=(2, 3)))


def check(reshape: bool, folder: Path) -> list:
    import onnxruntime as ort
    import openvino as ov

    torch.manual_seed(0)
    model = Pool(reshape=reshape).eval()
    x = torch.randn(3, 8, 6, 6)
    path = folder / f"pool-{'reshape' if reshape else 'mean23'}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = []
    for n in (1, 2, 3):
        with torch.no_grad():
            ref = model(x[:n]).numpy()
        got_ov = compiled({"x": x[:n].numpy()})[compiled.outputs[0]]
        got_ort = session.run(None, {"x": x[:n].numpy()})[0]
        rows.append((n, float(np.abs(ref - got_ov).max()), float(np.abs(ref - got_ort).max())))
    return rows


def main() -> int:
    try:
        import openvino as ov
    except ImportError:
        print("openvino is not installed (pip install openvino): nothing to reproduce")
        return 0
    print(f"openvino {ov.__version__}, torch {torch.__version__}")
    bad = False
    with tempfile.TemporaryDirectory() as d:
        for reshape in (True, False):
            for n, d_ov, d_ort in check(reshape, Path(d)):
                what = "BatchNorm1d(x.flatten(2).mean(-1))" if reshape else "BatchNorm1d(x.mean(dim=(2, 3)))"
                wrong = d_ov > 1e-4
                bad |= wrong
                print(f"{what:<38} batch {n}: max|Δ| openvino {d_ov:.2e}, onnxruntime {d_ort:.2e}"
                      f"{'   <- wrong' if wrong else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
