"""Run by test_triton_capture.py in a subprocess (CAER_FAST_TEST_TRITON_CAPTURE=1, no interpreter, no GPU):
triton's driver is replaced by one that only names an sm_90 target, the Triton functions are put under
the CPU key as the "triton" backend puts them under the CUDA key, and torch.compile's AOT graphs must
hold the kernels themselves (``triton_kernel_wrapper_functional`` nodes, forward and backward), as
they will on a GPU. The graphs are not run.
"""
import logging
import os

import pytest

if os.environ.get("CAER_FAST_TEST_TRITON_CAPTURE") != "1" or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("run by tests/ops/test_triton_capture.py", allow_module_level=True)

import torch  # noqa: E402
import triton  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import caer_fast.ops as ops  # noqa: E402
from caer_fast.ops import _dispatch  # noqa: E402


class _TargetOnlyDriver:
    """Enough of a driver for torch's kernel analysis (TTIR for sm_90); launching is an error."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):
        raise RuntimeError(f"no GPU here: triton driver.{name}")


def _targets(gm):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            fn = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn
            out.append(f"triton:{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}")
        else:
            out.append(str(node.target))
    return out


def test_kernels_are_captured_into_the_graph():
    triton.runtime.driver.set_active(_TargetOnlyDriver())
    warnings = []  # torch's mutation analysis (TTIR for sm_90) must succeed, not fall back to "all mutated"

    class _Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    wrap_log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    wrap_log.addHandler(_Collect(logging.WARNING))
    wrap_log.propagate = False

    lib = torch.library.Library("caer_fast", "IMPL")
    compile_helpers = _dispatch._kernels("_compile")
    for op in ("attention_pool", "adaptive_fusion"):
        compile_helpers.register(lib, _dispatch._kernels(op), ["CPU"])
    seen = {"fw": [], "bw": []}

    def record(stage):
        def compiler(gm, _):
            seen[stage] += _targets(gm)
            outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            vals = [o.meta["val"] if isinstance(o, torch.fx.Node) else o for o in outs]

            def stub(args):  # the graph cannot run without a GPU: outputs of the right shapes
                return [torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v for v in vals]
            stub._boxed_call = True
            return stub
        return compiler

    def fn(f, x, face, ctx, fs, cs):
        out, att = ops.attention_pool(f, x, True)
        fused, w = ops.adaptive_fusion(face, ctx, fs, cs, return_weights=True)
        return out.sum() + att.sum() + fused.sum() + w.sum()

    inputs = [torch.randn(*s, requires_grad=True) for s in [(2, 5, 3, 3), (2, 1, 3, 3), (3, 4), (3, 5), (3, 1),
                                                            (3, 1)]]
    with ops.use_backend("cpp"):  # the op on CPU tensors: the CPU key, where the Triton functions are now
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record("fw"),
                                                                           bw_compiler=record("bw")))
        compiled(*inputs).backward()
    lib._destroy()
    kernels = sorted(t for t in seen["fw"] if t.startswith("triton:"))
    assert kernels == ["triton:adaptive_fusion._fwd_kernel", "triton:attention_pool._attention_kernel",
                       "triton:attention_pool._fwd_kernel"], seen["fw"]
    kernels = sorted(t for t in seen["bw"] if t.startswith("triton:"))
    assert kernels == ["triton:adaptive_fusion._bwd_kernel", "triton:attention_pool._bwd_kernel"], seen["bw"]
    assert not any("caer_fast." in t for t in seen["fw"] + seen["bw"]), "the ops were not decomposed"
    assert not warnings, warnings
