"""int8 serving: swap a :class:`~caer_fast.serving.inference.Predictor`'s model for its int8 form
(``predict`` / ``serve --int8 --calibrate ROOT``, or ``--engine int8``)."""
from __future__ import annotations

import logging
import time
from typing import Sequence

from ..data.calibration import calibration_batches
from ..models.quantize import Int8Model, _check_model, quantize_int8

log = logging.getLogger("caer_fast.quantize")


def quantize_predictor(predictor, root, samples: int = 64, warmup_batch_sizes: Sequence[int] = (1, 2),
                       out=None) -> Int8Model:
    """Swap a :class:`~caer_fast.serving.inference.Predictor`'s model for its int8 form, calibrated on
    ``samples`` images of ``root`` preprocessed with the predictor's own input sizes. Progress lines go
    to ``out`` (a file, e.g. ``sys.stderr``)."""
    say = (lambda msg: print(msg, file=out, flush=True)) if out is not None else log.info
    if predictor.device.type != "cpu":
        raise ValueError(f"--int8 runs on CPU (oneDNN x86 int8 kernels), not {predictor.device}: use --device cpu")
    _check_model(predictor.model)  # before reading any data
    crop = predictor.crop[2] if predictor.crop else None
    t = time.perf_counter()
    batches = calibration_batches(root, samples, face_size=predictor.face_size,
                                  context_size=predictor.context_size, crop=crop)
    n = sum(len(f) for f, _ in batches)
    say(f"int8: read {n} calibration images from {root} in {time.perf_counter() - t:.1f}s")
    fast = quantize_int8(predictor.model, batches)
    i = fast.info
    say(f"int8: calibrated on {i['calibration_samples']} samples ({i['calibration_batches']} batches) in "
        f"{i['calibration_s']:.1f}s; {i['int8_convs']} convs and {i['int8_linears']} linears in int8, "
        f"{', '.join(i['fp32_custom_ops']) or 'no custom ops'} in fp32")
    sizes = sorted({int(b) for b in warmup_batch_sizes if int(b) >= 1})
    if sizes:
        say(f"int8: compiling for batch sizes {', '.join(map(str, sizes))} (torch.compile, oneDNN int8) …")
        i["warmup_s"] = fast.warmup(sizes)
        say(f"int8: compiled in {i['warmup_s']:.1f}s")
    predictor.model = fast
    predictor.int8_info = i
    return fast
