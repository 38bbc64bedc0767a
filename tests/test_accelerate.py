"""accelerate(): a live community-layout model keeps its class, parameters, state_dict and outputs,
with caer_fast's modules (and the fused ops inside them) swapped in."""
import itertools
from pathlib import Path

import pytest
import torch

import caer_fast
from caer_fast.models.caer_net import Encoder, FusionNetwork, TwoStreamNetwork
from caer_fast.ops import AdaptiveFusion, AttentionPool

from caer_fast.testing.community_model import CommunityCAERSNet, randomize_bn_
from caer_fast.testing.op_checks import ops_called

REFERENCE_TSV = next((p for p in (Path(__file__).resolve().parents[1].parent / "shared" / "reference",
                                  Path("/work/shared/reference")) if (p / "caersnet_state_dict.tsv").is_file()),
                     Path("shared/reference")) / "caersnet_state_dict.tsv"


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


def test_accelerated_model_shows_the_modules_and_runs_the_ops():
    model = CommunityCAERSNet().eval()
    params = [id(p) for p in model.parameters()]
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    caer_fast.accelerate(model)
    assert [id(p) for p in model.parameters()] == params, "accelerate must keep the model's own parameters"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    assert isinstance(model.two_stream_net, TwoStreamNetwork) and isinstance(model.fusion_net, FusionNetwork)
    assert isinstance(model.two_stream_net.attention_pool, AttentionPool)
    assert isinstance(model.fusion_net.adaptive_fusion, AdaptiveFusion)
    assert all(isinstance(getattr(model.two_stream_net, n), Encoder) for n in
               ("face_encoding_module", "context_encoding_module", "attention_inference_module"))
    text = repr(model)
    assert "(attention_pool): AttentionPool()" in text and "(adaptive_fusion): AdaptiveFusion()" in text
    if caer_fast.ops.backend("cpu") != "torch":
        called = ops_called(lambda: model(torch.randn(1, 3, 96, 96), torch.randn(1, 3, 112, 112)))
        assert "caer_fast.attention_pool.default" in called and "caer_fast.adaptive_fusion.default" in called
    assert caer_fast.accelerate(model) is model  # twice is a no-op


@pytest.mark.skipif(not REFERENCE_TSV.exists(), reason="the community state_dict reference is not on this machine")
def test_state_dicts_match_the_community_reference():
    """Our CAERSNet and an accelerated community model keep the community's exact state_dict."""
    want = [line.split("\t")[:2] for line in REFERENCE_TSV.read_text().strip().splitlines()]
    want = [(k, v) for k, v in want if not k.startswith("#") and k != "name"]
    for model in (caer_fast.models.CAERSNet(), caer_fast.accelerate(CommunityCAERSNet())):
        got = [(k, str(list(v.shape))) for k, v in model.state_dict().items()]
        assert got == want


def test_keyword_only_arguments_keep_the_models_apart():
    from caer_fast.models import CAERNet, CAERSNet

    with pytest.raises(TypeError):
        CAERSNet(True, True, False, 7)  # num_classes is keyword-only
    with pytest.raises(TypeError, match="booleans"):
        CAERSNet(7)  # a CAERNet argument list
    with pytest.raises(TypeError, match="bool"):
        CAERNet(True, True)  # a CAERSNet argument list
    assert CAERSNet(True, False, num_classes=5).fusion_net.fc2.out_features == 5
    assert CAERNet(5, 8, use_context=False).fusion_net.use_context is False


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
    encoders = [m for m in fast.modules() if isinstance(m, Encoder)]
    with torch.no_grad():
        fast(face, context)
    assert all(e._folded is not None for e in encoders), "no_grad call did not take the folded path"
    for e in encoders:
        e._folded = None
    model(face, context).square().sum().backward()
    fast(face, context).square().sum().backward()
    assert all(e._folded is None for e in encoders)
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-9, msg=name)
