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


def _pair(seed):
    """A community model and an accelerated deep copy with the same weights and random BN statistics."""
    import copy

    g = torch.Generator().manual_seed(seed)
    model = randomize_bn_(CommunityCAERSNet(), g).eval()
    return model, caer_fast.accelerate(copy.deepcopy(model)), g


def test_eval_fast_path_follows_weight_changes():
    """Folded weights are cached under no_grad / inference_mode and refreshed when the model changes."""
    model, fast, g = _pair(11)
    face, context = torch.randn(3, 3, 96, 96, generator=g), torch.randn(3, 3, 112, 112, generator=g)
    for step in range(3):
        with torch.inference_mode():
            want, got = model(face, context), fast(face, context)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(fast(face, context), want, rtol=1e-4, atol=1e-5)
            for m in (model, fast):  # the same in-place change to both: an optimizer step, new statistics
                torch.manual_seed(step)
                for p in m.parameters():
                    p.add_(0.05 * torch.randn_like(p))
                m.two_stream_net.context_encoding_module.bn[2].running_var.mul_(1.5)
    fast.load_state_dict(randomize_bn_(CommunityCAERSNet(), torch.Generator().manual_seed(3)).state_dict())
    model.load_state_dict(fast.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fast(face, context), model(face, context), rtol=1e-4, atol=1e-5)


def test_eval_fast_path_only_without_autograd():
    """With autograd on the encoders are the model's own (gradients exactly as before accelerate); the
    folded channels_last path runs under no_grad / inference_mode only, and is used there."""
    model, fast, g = _pair(12)
    face, context = torch.randn(2, 3, 96, 96, generator=g), torch.randn(2, 3, 112, 112, generator=g)
    with torch.no_grad():
        fast(face, context)
    assert fast.__dict__.get("_caer_fast_folded"), "no_grad call did not take the folded path"
    fast.__dict__.pop("_caer_fast_folded")
    model(face, context).square().sum().backward()
    fast(face, context).square().sum().backward()
    assert "_caer_fast_folded" not in fast.__dict__
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-9, msg=name)
