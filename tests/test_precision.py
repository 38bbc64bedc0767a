"""bf16 training where the CPU has it (optimize(model, "train", precision="auto")): the decision rule, and
the measurement that feeds it. The build machines are AVX2-only, so the bf16 branch is exercised here by
forcing ``native_bf16``; whether bf16 wins on a real AVX-512 BF16 CPU is measured there, not here."""
import pytest
import torch

import caer_fast
from caer_fast.models import CAERSNet
from caer_fast.models.optimize import GUARD_STEPS, choose_train_precision, decide_precision
from caer_fast import devices as engines  # cpu_flags / has_native_bf16 live in caer_fast.devices


def test_rule_needs_native_bf16_a_faster_step_and_convergence():
    assert decide_precision(False, 1.0, 0.1, 2.0, 1.0, 1.0)["precision"] == "fp32"
    assert "no native bf16" in decide_precision(False)["reason"]
    assert decide_precision(True)["precision"] == "fp32"  # not measured: no guess
    slow = decide_precision(True, 1.0, 0.99, 2.0, 1.0, 1.0)
    assert slow["precision"] == "fp32" and "not faster" in slow["reason"]
    fast_ok = decide_precision(True, 1.0, 0.5, 2.0, 1.0, 1.04)
    assert fast_ok["precision"] == "bf16" and fast_ok["speedup"] == pytest.approx(2.0)
    for bad_final in (1.5, float("nan"), float("inf"), 2.1):  # diverged, NaN, or no progress from the start
        r = decide_precision(True, 1.0, 0.5, 2.0, 1.0, bad_final)
        assert r["precision"] == "fp32" and "convergence guard" in r["reason"], bad_final


def test_this_cpu_flags_decide_without_measuring(monkeypatch):
    native = engines.has_native_bf16()
    flags = set(engines.cpu_flags())
    assert native == bool(flags & {"avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(engines, "has_native_bf16", lambda: False)
    model = CAERSNet()
    calls = []
    monkeypatch.setattr(torch.optim, "SGD", lambda *a, **k: calls.append(1))  # must not train anything
    r = choose_train_precision(model, torch.randn(2, 3, 48, 48), torch.randn(2, 3, 56, 56))
    assert r["precision"] == "fp32" and not calls


class Tiny(torch.nn.Module):
    """Two streams, BN, a head: the shape of a train step, small enough for emulated bf16 on AVX2."""

    def __init__(self):
        super().__init__()
        self.f, self.c = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(16)
        self.head = torch.nn.Linear(16, 7)

    def forward(self, face, context):
        x = torch.cat([torch.relu(self.f(face)).mean((2, 3)), torch.relu(self.c(context)).mean((2, 3))], -1)
        return self.head(self.bn(x))


def test_measured_decision_runs_on_copies_and_is_consistent():
    torch.manual_seed(0)
    model = Tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    face, context = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    r = choose_train_precision(model, face, context, native_bf16=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN statistics untouched
    assert r["fp32_step_s"] > 0 and r["bf16_step_s"] > 0
    assert r["loss_fp32"] < r["loss_start"]  # GUARD_STEPS steps on one batch do reduce the loss
    expect = decide_precision(True, r["fp32_step_s"], r["bf16_step_s"], r["loss_start"], r["loss_fp32"], r["loss_bf16"])
    assert r["precision"] == expect["precision"] and GUARD_STEPS >= 3


def test_optimize_train_records_its_precision(monkeypatch):
    monkeypatch.setattr(engines, "has_native_bf16", lambda: False)
    model = CAERSNet().train()
    fast = caer_fast.optimize(model, "train", compile=False)
    assert fast.info["precision"] is None  # decided on the first call
    out = fast(torch.randn(2, 3, 48, 48), torch.randn(2, 3, 56, 56))
    assert out.dtype == torch.float32 and fast.info["precision"] == "fp32"
    forced = caer_fast.optimize(model, "train", compile=False, precision="bf16")
    assert forced is not fast and forced(torch.randn(2, 3, 48, 48), torch.randn(2, 3, 56, 56)).dtype == torch.bfloat16
    assert caer_fast.optimize(model, "inference", compile=False).info["precision"] == "fp32"
    with pytest.raises(ValueError, match="precision"):
        caer_fast.optimize(model, "train", precision="fp16")
