"""Every Triton kernel compiled ahead of time to cubin for sm_80 and sm_90 by Triton's own compiler and
its bundled ptxas, no GPU needed (tests/triton_aot.py, in a subprocess): fails on a compile error, a
register spill, shared memory over the target's limit, or a kernel with no launch configs listed."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import triton_aot

ROOT = Path(__file__).resolve().parent.parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot.py"), "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=3000)
    assert out.exists(), f"no result (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(out.read_text())
    assert not result["uncovered"], f"kernels with no launch configs in triton_aot.LAUNCHES: {result['uncovered']}"
    bad = [f"{r['op']}.{r['kernel']} [{r['config']}] {r['arch']}: {r['error']}" for r in result["rows"]
           if r["error"]]
    assert not bad, "\n".join(bad)
    seen = {(r["op"], r["kernel"], r["arch"]) for r in result["rows"]}
    kernels = {(op, k) for op, ks in triton_aot.LAUNCHES.items() for k in _kernel_names(result, op)}
    assert seen == {(op, k, a) for op, k in kernels for a in ("sm_80", "sm_90")}
    assert all(r["registers"] > 0 and r["cubin_bytes"] > 0 for r in result["rows"])
    squeezed = result["squeezed"]  # the same PTX forced into 24 registers: the check sees the spills
    assert squeezed["spill_stores"] > 0 and squeezed["registers"] <= 24, squeezed


def _kernel_names(result, op):
    return {r["kernel"] for r in result["rows"] if r["op"] == op}


def test_limits_flag_spills_shared_memory_and_registers():
    ok = dict(registers=96, num_warps=4, shared=1024, spill_stores=0, spill_loads=0)
    assert triton_aot.problems(ok, 90) == []
    assert "spills" in triton_aot.problems(dict(ok, spill_stores=8), 90)[0]
    assert "spills" in triton_aot.problems(dict(ok, spill_loads=4), 80)[0]
    assert triton_aot.problems(dict(ok, shared=200_000), 90) == []  # fits an H100/H200 ...
    assert "shared memory" in triton_aot.problems(dict(ok, shared=200_000), 80)[0]  # ... not an A100
    assert "registers" in triton_aot.problems(dict(ok, registers=200, num_warps=16), 90)[0]  # 200 × 512 > 64K


@needs_triton
def test_ptxas_report_reads_registers_and_spills():
    """The bundled ptxas on a hand-written PTX kernel whose local array is forced to memory."""
    ptx = """
.version 8.0
.target sm_80
.address_size 64
.visible .entry probe(.param .u64 p)
{
    .local .align 4 .b8 buf[64];
    .reg .b64 %rd<4>;
    .reg .b32 %r<4>;
    ld.param.u64 %rd1, [p];
    mov.u32 %r1, 7;
    st.local.u32 [buf], %r1;
    ld.local.u32 %r2, [buf];
    st.global.u32 [%rd1], %r2;
    ret;
}
"""
    rep = triton_aot.ptxas_report(ptx, 80)
    assert rep["registers"] > 0 and rep["spill_stores"] == 0 and rep["stack"] >= 0


@needs_triton
def test_launch_list_covers_every_tap_tile_width():
    """Every KXC face_context can launch with (any frame size, any output size) is in the AOT launch list."""
    from caer_fast.ops._dispatch import _kernels

    fc = _kernels("face_context")  # also importable in a `setup.py develop` install
    listed = {cfg["KXC"] for kernel, _, _, cfg in triton_aot.LAUNCHES["face_context"]()}
    launched = {fc.tap_chunk(taps) for taps in range(1, 2000)}
    assert launched <= listed, f"tile widths launched but not compiled ahead of time: {sorted(launched - listed)}"
