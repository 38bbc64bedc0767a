"""Whole-model speed: the community CAER-S model (eager) vs ours (eager) vs ``caer_fast.optimize``,
``caer_fast.accelerate(community model)``, and the video CAER-Net (ours eager vs ``optimize``).

Run: ``pytest bench/test_models.py --benchmark-only --benchmark-group-by=group`` (a ratio table with
GFLOP/s follows the run). Each case first checks its output against the reference implementation,
so a fast-but-wrong path cannot win. The first call (the compile, for ``optimize``) is timed apart
and reported as ``first_call_s``; timed rounds start after it.

The limit: the fp32 matmul rate is measured in the same run (best of 5 ``2048×2048`` products at the
run's thread count), and each row says what share of it the implementation reaches; "ceiling" is
how much faster than the group's baseline a path running at that rate could be. Peak memory is the
high-water mark of tensor bytes allocated during one call above what existed before it (from the
profiler's allocator events, so oneDNN's private scratch buffers are not included).
"""
import copy
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import caer_fast
from caer_fast.models import CAERNet, CAERSNet
from caer_fast.testing.community_model import CommunityCAERSNet, randomize_bn_  # the reference re-statement

CASES = {  # name: (batch, face shape, context shape)
    "caers-b32": (32, (3, 96, 96), (3, 112, 112)),
    "caer-video-b4": (4, (3, 16, 96, 96), (3, 16, 112, 112)),
}
ROUNDS = {"caers-b32": 5, "caer-video-b4": 3}


def _inputs(case, seed=0):
    n, fs, cs = CASES[case]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *fs, generator=g), torch.randn(n, *cs, generator=g),
            torch.randint(0, 7, (n,), generator=g))


def _models(case):
    """(reference eager model, ours eager) with the same weights and random BN statistics."""
    torch.manual_seed(0)
    if case == "caers-b32":
        community = randomize_bn_(CommunityCAERSNet(), torch.Generator().manual_seed(1))
        ours = CAERSNet()
        ours.load_state_dict(community.state_dict())
        return community, ours
    ours = randomize_bn_(CAERNet(frames=16), torch.Generator().manual_seed(1))
    return None, ours


def _flops(model, face, context, target, train):
    with FlopCounterMode(display=False) as counter:
        if train:
            F.cross_entropy(model(face, context), target).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(face, context)
    return counter.get_total_flops()


def _peak_bytes(fn):
    """High-water mark of tensor bytes allocated while ``fn`` runs, above what existed before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def _record(benchmark, case, mode, impl, flops, fn, first_call_s=None, info=None):
    benchmark.group = f"{case} {mode}"
    benchmark.extra_info.update(model_case=case, mode=mode, implementation=impl, flops=flops,
                                threads=torch.get_num_threads(), first_call_s=first_call_s,
                                peak_mb=_peak_bytes(fn) / 2 ** 20, **(info or {}))


def _run(benchmark, fn, case):
    benchmark.pedantic(fn, rounds=ROUNDS[case], warmup_rounds=1, iterations=1)


INFERENCE = [("caers-b32", "community-eager"), ("caers-b32", "community-accelerate"),
             ("caers-b32", "ours-eager"), ("caers-b32", "ours-optimize"), ("caers-b32", "ours-int8"),
             ("caer-video-b4", "ours-eager"), ("caer-video-b4", "ours-optimize")]
# ours-int8 (caer_fast.quantize_int8, calibrated on 4 random batches of 16) is checked loosely against fp32:
# |Δlogit| at most 5 % of the largest |logit| (mean 1 %) and argmax agreement >= 95 %
INT8_MAX_REL, INT8_MEAN_REL, INT8_AGREEMENT = 0.05, 0.01, 0.95


def _int8(ours, case):
    n, fs, cs = CASES[case]
    g = torch.Generator().manual_seed(123)
    calib = [(torch.randn(16, *fs, generator=g), torch.randn(16, *cs, generator=g)) for _ in range(4)]
    t = time.perf_counter()
    model = caer_fast.quantize_int8(ours, calib)
    return model, time.perf_counter() - t


def _check_int8(got, want):
    scale = want.abs().max()
    err = (got - want).abs()
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    msg = f"int8: max |Δ| {err.max():.3g}, mean {err.mean():.3g}, logits up to {scale:.3g}, agreement {agree:.1%}"
    assert err.max() <= INT8_MAX_REL * scale and err.mean() <= INT8_MEAN_REL * scale, msg
    assert agree >= INT8_AGREEMENT, msg
    return {"int8_max_rel_err": float(err.max() / scale), "int8_argmax_agreement": agree}


@pytest.mark.parametrize("case,impl", INFERENCE, ids=[f"{c}-{i}" for c, i in INFERENCE])
def test_inference(benchmark, case, impl):
    community, ours = _models(case)
    face, context, _ = _inputs(case)
    reference = (community if community is not None else ours).eval()
    with torch.no_grad():
        want = reference(face, context)
        flops = _flops(reference, face, context, None, train=False)
    first, info = None, {}
    if impl == "community-eager":
        model = community.eval()
    elif impl == "community-accelerate":
        model = caer_fast.accelerate(copy.deepcopy(community)).eval()
    elif impl == "ours-eager":
        model = ours.eval()
    elif impl == "ours-int8":
        model, quantize_s = _int8(ours, case)
    else:
        model = caer_fast.optimize(ours, "inference")

    def call():
        with torch.inference_mode():
            return model(face, context)

    t = time.perf_counter()
    got = call()
    first = time.perf_counter() - t
    if impl == "ours-int8":
        info = {**_check_int8(got, want), "quantize_s": quantize_s, "reduce_range": model.info["reduce_range"]}
    else:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    if impl == "ours-optimize":
        info = {k: v for k, v in model.info.items() if k in ("compiled", "fullgraph", "memory_format")}
    _record(benchmark, case, "inference", impl, flops, call, first, info)
    _run(benchmark, call, case)


TRAIN = [("caers-b32", "community-eager"), ("caers-b32", "ours-eager"), ("caers-b32", "ours-optimize"),
         ("caer-video-b4", "ours-eager"), ("caer-video-b4", "ours-optimize")]


@pytest.mark.parametrize("case,impl", TRAIN, ids=[f"{c}-{i}" for c, i in TRAIN])
def test_train_step(benchmark, case, impl, request):
    """One SGD step (forward, cross-entropy, backward, momentum update) at batch 32 / 4."""
    # the compiled step draws dropout masks with eager's generator, so its first step can be
    # compared with the reference's from the same seed
    from torch._inductor import config as inductor_config

    # a graph compiled earlier in this process for another CAERSNet (bench/test_end_to_end.py) would be
    # reused without fallback_random: compile afresh
    torch._dynamo.reset()
    stack = inductor_config.patch(fallback_random=True)
    stack.__enter__()
    request.addfinalizer(lambda: stack.__exit__(None, None, None))
    community, ours = _models(case)
    face, context, target = _inputs(case)
    reference = (community if community is not None else ours).train()
    ref_model = copy.deepcopy(reference)
    flops = _flops(ref_model, face, context, target, train=True)
    torch.manual_seed(5)
    want = F.cross_entropy(ref_model(face, context), target).item()

    if impl == "community-eager":
        model = community.train()
        call_model = model
    elif impl == "ours-eager":
        model = ours.train()
        call_model = model
    else:
        model = ours.train()
        call_model = caer_fast.optimize(model, "train")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        loss = F.cross_entropy(call_model(face, context), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    torch.manual_seed(5)
    t = time.perf_counter()
    got = step().item()
    first = time.perf_counter() - t
    info = {}
    if impl == "ours-optimize":
        info = {k: v for k, v in call_model.info.items()
                if k in ("compiled", "fullgraph", "memory_format", "precision")}
    # precision="auto" trains bf16 where the CPU has it natively: a bf16 forward's loss is ~1-3 % off
    # fp32's (measured 1.969 vs 1.925 on an AVX-512 BF16 EPYC); fp32 paths differ by summation order only
    tol = 5e-2 if info.get("precision") == "bf16" else 1e-4
    assert got == pytest.approx(want, rel=tol, abs=tol), (got, want, info.get("precision"))
    _record(benchmark, case, "train", impl, flops, step, first, info)
    _run(benchmark, step, case)
