"""accelerate(): a live community-layout model keeps its class and outputs, with the fused ops inside."""
import itertools

import pytest
import torch

import caer_fast
from caer_fast.models.accelerate import MARK

from community_model import CommunityCAERSNet, randomize_bn_


@pytest.mark.parametrize("use_face,use_context,concat", list(itertools.product([True, False], [True, False], [False, True])))
def test_accelerate_keeps_outputs_and_gradients(use_face, use_context, concat):
    g = torch.Generator().manual_seed(5)
    model = randomize_bn_(CommunityCAERSNet(use_face, use_context, concat), g).eval()
    face = torch.randn(2, 3, 96, 96, generator=g, requires_grad=True)
    context = torch.randn(2, 3, 112, 112, generator=g, requires_grad=True)
    before = model(face, context)
    (gf, gc) = torch.autograd.grad(before.sum(), (face, context), allow_unused=True)
    out = caer_fast.accelerate(model)
    assert out is model and type(model) is CommunityCAERSNet
    after = model(face, context)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    (hf, hc) = torch.autograd.grad(after.sum(), (face, context), allow_unused=True)
    for new, old, x in ((hf, gf, face), (hc, gc, context)):  # None: the input does not reach the output
        new = torch.zeros_like(x) if new is None else new
        old = torch.zeros_like(x) if old is None else old
        torch.testing.assert_close(new, old, rtol=1e-3, atol=1e-6)


def test_accelerated_model_uses_the_ops_and_says_so(monkeypatch):
    model = CommunityCAERSNet().eval()
    caer_fast.accelerate(model)
    assert MARK in repr(model)
    calls = []
    from caer_fast.ops import _dispatch

    real = _dispatch.implementation
    monkeypatch.setattr(_dispatch, "implementation", lambda op, t: calls.append(op) or real(op, t))
    model(torch.randn(1, 3, 96, 96), torch.randn(1, 3, 112, 112))
    assert calls == ["attention_pool", "adaptive_fusion"]


def test_accelerate_rejects_other_models():
    with pytest.raises(TypeError, match="community-layout"):
        caer_fast.accelerate(torch.nn.Linear(2, 2))
