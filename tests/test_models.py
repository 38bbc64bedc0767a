"""Models: layout and numbers of the community CAER-S model, the video model, checkpoints."""
import itertools
import os
from pathlib import Path

import pytest
import torch

import caer_fast
from caer_fast.models import CAERNet, CAERSNet
from caer_fast.models.checkpoint import CheckpointError

from caer_fast.testing.community_model import CommunityCAERSNet, randomize_bn_

REFERENCE_TSV = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "caersnet_state_dict.tsv"
VARIANTS = list(itertools.product([True, False], [True, False], [False, True]))  # use_face, use_context, concat


def _reference_layout():
    if not REFERENCE_TSV.is_file():
        pytest.skip(f"{REFERENCE_TSV} not found (shared/ sits beside the checkout)")
    rows = [line.split("\t") for line in REFERENCE_TSV.read_text().splitlines() if line.strip()]
    return [(k, [int(x) for x in s.strip("[]").split(",") if x.strip()]) for k, s in rows]


def test_state_dict_matches_community_layout():
    layout = _reference_layout()
    sd = CAERSNet().state_dict()
    assert [k for k, _ in layout] == list(sd)
    for k, shape in layout:
        assert list(sd[k].shape) == shape, k
    trainable = sum(p.numel() for p in CAERSNet().parameters() if p.requires_grad)
    assert trainable == 2_390_028


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("use_face,use_context,concat", VARIANTS)
def test_caersnet_equals_community_model_eval(use_face, use_context, concat):
    g = torch.Generator().manual_seed(hash((use_face, use_context, concat)) % 1000)
    community = randomize_bn_(CommunityCAERSNet(use_face, use_context, concat), g).eval()
    ours = CAERSNet(use_face, use_context, concat).eval()
    ours.load_state_dict(community.state_dict(), strict=True)
    face = torch.randn(3, 3, 96, 96, generator=g)
    context = torch.randn(3, 3, 112, 112, generator=g)
    fr, cr = face.clone().requires_grad_(), context.clone().requires_grad_()
    fo, co = face.clone().requires_grad_(), context.clone().requires_grad_()
    ref, out = community(fr, cr), ours(fo, co)
    assert _rel_err(out, ref) < 1e-4
    w = torch.randn(ref.shape, generator=g)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    for ours_x, ref_x, used in ((fo, fr, use_face), (co, cr, use_context)):
        ref_g = ref_x.grad if ref_x.grad is not None else torch.zeros_like(ref_x)
        our_g = ours_x.grad if ours_x.grad is not None else torch.zeros_like(ours_x)
        if used:
            assert ref_g.abs().max() > 0
            assert _rel_err(our_g, ref_g) < 1e-4
        else:  # a dropped stream only reaches the output through the fusion weights: tiny gradients
            torch.testing.assert_close(our_g, ref_g, rtol=1e-3, atol=1e-7)


def test_caersnet_equals_community_model_train_mode_with_param_grads():
    # float64, so that the comparison measures the models, not float32 summation order
    torch.manual_seed(1)
    community = CommunityCAERSNet().double().train()
    ours = CAERSNet().double().train()
    ours.load_state_dict(community.state_dict())
    face = torch.randn(4, 3, 96, 96, dtype=torch.float64)
    context = torch.randn(4, 3, 112, 112, dtype=torch.float64)
    torch.manual_seed(7)  # same dropout mask
    ref = community(face, context)
    torch.manual_seed(7)
    out = ours(face, context)
    assert _rel_err(out, ref) < 1e-10
    ref.square().sum().backward()
    out.square().sum().backward()
    ref_grads = dict(community.named_parameters())
    for name, p in ours.named_parameters():
        if name.endswith("bias") and ".convs." in name:
            # a conv bias before train-mode BN has a zero gradient in exact arithmetic: only noise is left
            assert (p.grad - ref_grads[name].grad).abs().max() < 1e-12, name
        else:
            assert _rel_err(p.grad, ref_grads[name].grad) < 1e-8, name
    # running statistics moved the same way
    for (name, a), (_, b) in zip(ours.state_dict().items(), community.state_dict().items()):
        if "running" in name:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


def test_return_details_shapes_and_meaning():
    model = CAERSNet().eval()
    logits, details = model(torch.randn(2, 3, 96, 96), torch.randn(2, 3, 112, 112), return_details=True)
    assert logits.shape == (2, 7)
    att, w = details["attention"], details["fusion_weights"]
    assert att.shape == (2, 1, 7, 7)
    torch.testing.assert_close(att.flatten(1).sum(1), torch.ones(2))
    assert (att >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2))


def test_video_model_shapes_and_space_time_attention():
    torch.manual_seed(0)
    model = CAERNet().eval()
    face, context = torch.randn(2, 3, 16, 96, 96), torch.randn(2, 3, 16, 112, 112)
    logits, details = model(face, context, return_details=True)
    assert logits.shape == (2, 7)
    assert details["attention"].shape == (2, 1, 2, 7, 7)  # softmax over time × space
    torch.testing.assert_close(details["attention"].flatten(1).sum(1), torch.ones(2))
    # batch independence in eval mode
    torch.testing.assert_close(model(face[:1], context[:1]), logits[:1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="clips"):
        model(torch.randn(1, 3, 96, 96), torch.randn(1, 3, 112, 112))


def test_video_model_gradients_reach_both_streams():
    torch.manual_seed(0)
    model = CAERNet(frames=8).train()
    face = torch.randn(2, 3, 8, 48, 48, requires_grad=True)
    context = torch.randn(2, 3, 8, 56, 56, requires_grad=True)
    model(face, context).logsumexp(1).sum().backward()
    assert face.grad.abs().sum() > 0 and context.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_stream_ablation_ignores_the_dropped_stream():
    torch.manual_seed(0)
    model = CAERSNet(use_context=False).eval()
    face = torch.randn(2, 3, 96, 96)
    a = model(face, torch.randn(2, 3, 112, 112))
    b = model(face, torch.randn(2, 3, 112, 112))
    torch.testing.assert_close(a, b)


def test_community_checkpoint_file_loads(tmp_path):
    torch.manual_seed(0)
    community = randomize_bn_(CommunityCAERSNet(), torch.Generator().manual_seed(3)).eval()
    # the community trainer saves DataParallel weights under "state_dict" with extra keys
    sd = {f"module.{k}": v for k, v in community.state_dict().items()}
    path = tmp_path / "model_best.pth"
    torch.save({"arch": "CAERSNet", "epoch": 150, "state_dict": sd, "optimizer": {}, "monitor_best": 0.76,
                "config": {"name": "CAER-S"}}, path)
    model = caer_fast.load_checkpoint(path)
    assert isinstance(model, CAERSNet)
    model.eval()
    x = torch.randn(2, 3, 96, 96), torch.randn(2, 3, 112, 112)
    assert _rel_err(model(*x), community(*x)) < 1e-4
    into = caer_fast.load_checkpoint(path, CAERSNet())
    torch.testing.assert_close(into.state_dict()["fusion_net.fc2.bias"], community.state_dict()["fusion_net.fc2.bias"])


def test_our_checkpoint_round_trip_builds_the_right_model(tmp_path):
    torch.manual_seed(0)
    model = CAERNet(frames=8, use_context=False).eval()
    path = caer_fast.save_checkpoint({"model": model.state_dict(), "model_args": {"frames": 8, "use_context": False},
                                      "epoch": 3}, tmp_path / "sub" / "checkpoint.pth")
    loaded = caer_fast.load_checkpoint(path).eval()
    assert isinstance(loaded, CAERNet) and loaded.frames == 8 and not loaded.fusion_net.use_context
    x = torch.randn(1, 3, 8, 48, 48), torch.randn(1, 3, 8, 56, 56)
    torch.testing.assert_close(loaded(*x), model(*x))
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    sd = CAERSNet().state_dict()
    sd.pop("fusion_net.fc1.weight")
    sd["fusion_net.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        caer_fast.load_checkpoint({"state_dict": sd}, CAERSNet())
    msg = str(err.value)
    assert "missing keys" in msg and "fusion_net.fc1.weight" in msg
    assert "unexpected keys" in msg and "fusion_net.extra.weight" in msg
    video_sd = CAERNet().state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        caer_fast.load_checkpoint(video_sd, CAERSNet())


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"state_dict": CAERSNet().state_dict(), "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        caer_fast.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    good = caer_fast.save_checkpoint({"model": CAERSNet().state_dict()}, tmp_path / "c.pth")
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        caer_fast.load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        caer_fast.load_checkpoint(tmp_path / "missing.pth")
