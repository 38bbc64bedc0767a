"""GPU tier for the models (skipped without a GPU; run by tools/gpu_check.py on a GPU machine):
CAERNet / CAERSNet compiled whole with the fused ops inside (fullgraph) on each GPU backend, a bf16-autocast
train step, and CUDA-graph inference through ``optimize``, each against the eager fp32 torch reference."""
import pytest
import torch
import torch.nn.functional as F

from caer_fast.models import CAERNet, CAERSNet

pytestmark = pytest.mark.gpu
CASES = {"caers": (CAERSNet, (4, 3, 96, 96), (4, 3, 112, 112)),
         "caer": (CAERNet, (2, 3, 16, 96, 96), (2, 3, 16, 112, 112))}


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _backend_or_skip(name, monkeypatch):
    import caer_fast.ops as ops

    monkeypatch.setenv("CAER_FAST_BACKEND", name)
    try:
        assert ops.backend(torch.device("cuda")) == name
    except ops.BackendUnavailableError as exc:
        pytest.skip(f"{name} backend unavailable: {exc}")


def _inputs(case, seed=0):
    cls, fshape, cshape = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    face, ctx = torch.randn(*fshape, generator=gen), torch.randn(*cshape, generator=gen)
    y = torch.randint(0, 7, (fshape[0],), generator=gen)
    return face.cuda(), ctx.cuda(), y.cuda()


def _model(case):
    torch.manual_seed(0)
    return CASES[case][0]().cuda()


def _loss_and_grads(fn, model, face, ctx, y):
    model.zero_grad(set_to_none=True)
    logits = fn(face, ctx)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    return logits.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_model_compiled_fullgraph(case, backend, monkeypatch):
    """torch.compile(fullgraph=True) of the whole model with the backend's ops inside: logits and every
    parameter gradient match the eager fp32 torch-backend model."""
    _backend_or_skip(backend, monkeypatch)
    model = _model(case).train()
    face, ctx, y = _inputs(case)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    got, got_g = _loss_and_grads(compiled, model, face, ctx, y)
    monkeypatch.setenv("CAER_FAST_BACKEND", "torch")
    ref, ref_g = _loss_and_grads(model, model, face, ctx, y)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    for name in ref_g:
        torch.testing.assert_close(got_g[name], ref_g[name], rtol=2e-3, atol=2e-4, msg=lambda m: f"{name}: {m}")


def _cos(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_bf16_autocast_train_step(case):
    """One bf16-autocast train step (the optimize('train') recipe): finite loss, gradients pointing the
    same way as fp32's, and the step lowers the loss on that batch."""
    model = _model(case).train()
    face, ctx, y = _inputs(case)
    ref, ref_g = _loss_and_grads(model, model, face, ctx, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, got_g = _loss_and_grads(model, model, face, ctx, y)
    assert torch.isfinite(got).all()
    assert _cos(got, ref) > 0.99
    for name in ref_g:
        if ref_g[name].abs().max() > 0:
            assert _cos(got_g[name], ref_g[name]) > 0.95, name
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.eval()  # dropout off and BN statistics fixed: the same function before and after the step
    for p, g in zip(model.parameters(), got_g.values()):
        p.grad = g.to(p.dtype)
    with torch.no_grad():
        before = F.cross_entropy(model(face, ctx).float(), y).item()
    opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(face, ctx).float(), y).item()
    assert after < before, (before, after)


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_optimize_inference_cuda_graphs(case):
    """optimize(model, 'inference') on CUDA (folded BN, compile, bf16, CUDA graphs): matches the eager fp32
    model, and replays give each new input its own output (no stale static buffers)."""
    from caer_fast import optimize

    model = _model(case).eval()
    fast = optimize(model, "inference")
    for seed in (0, 1, 2):
        face, ctx, _ = _inputs(case, seed)
        with torch.inference_mode():
            want = model(face, ctx).float()
            got = fast(face, ctx).float().clone()
        assert torch.isfinite(got).all()
        err = (got - want).abs().max().item()
        assert err <= 0.05 * max(1.0, want.abs().max().item()), (seed, err)
        if seed:
            assert not torch.equal(got, prev), "a replay returned the previous input's output"
        prev = got
