"""CUDA C++ of the fused ops: nvcc compiles the torch-free kernel files for sm_80 and sm_90 here with
``-Xptxas -v`` (no GPU needed) and fails on a register spill (tests/nvcc_ptxas.py); the gpu tier runs
the built extension against the torch reference.

The torch binding file (bindings.cu) takes minutes on the shared 2-core machines, so compiling
it is opt-in: CAER_FAST_TEST_NVCC_BINDINGS=1 (marked slow).
"""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import nvcc_ptxas
from caer_fast.testing.op_checks import check_adaptive_fusion, check_attention_pool, check_face_context

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
# the flags torch's CUDAExtension adds, so half/bf16 code compiles here as it will there
FLAGS = ["-gencode", "arch=compute_90,code=sm_90", "-O3", "--use_fast_math", "-std=c++17",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
         "-D__CUDA_NO_HALF2_OPERATORS__", f"-I{CUDA_DIR.parent}"]
LAUNCHERS = {"attention_pool_kernels.cu": ["attention_pool_forward", "attention_pool_backward"],
             "adaptive_fusion_kernels.cu": ["adaptive_fusion_forward", "adaptive_fusion_backward"],
             "face_context_kernels.cu": ["resize_normalize"]}
KERNEL_FILES = list(LAUNCHERS)


def _nvcc(args, tmp_path, timeout=300):
    proc = subprocess.run([NVCC, *FLAGS, *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"nvcc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_kernel_files_are_torch_free():
    for name in KERNEL_FILES + ["common.cuh", "launchers.h"]:
        text = (CUDA_DIR / name).read_text()
        assert "#include <torch" not in text and "#include <ATen" not in text and "#include <c10" not in text, name


def test_every_kernel_file_is_checked():
    assert sorted(KERNEL_FILES) == nvcc_ptxas.kernel_files(), "add the new .cu file's launchers to LAUNCHERS"


@needs_nvcc
@pytest.mark.parametrize("arch", nvcc_ptxas.ARCHES)
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_file_compiles_without_spills(name, arch, tmp_path):
    """nvcc -Xptxas -v for sm_80 / sm_90: every kernel instantiation compiles, none spills to local memory."""
    rc, log, rows = nvcc_ptxas.compile_file(name, arch, tmp_path)
    assert rc == 0, f"nvcc {name} sm_{arch} failed:\n{log[-6000:]}"
    assert rows and all("registers" in r and "spill_stores" in r for r in rows), log[-3000:]
    assert {r["arch"] for r in rows} == {f"sm_{arch}"}
    spills = [(r["kernel"], r["spill_stores"], r["spill_loads"]) for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, f"{name} sm_{arch}: register spills (kernel, store B, load B): {spills}"
    assert all(r["registers"] <= 255 for r in rows), rows
    for ty in ("<float>", "<__half>", "<__nv_bfloat16>"):  # every dtype's kernels were instantiated
        assert any(ty in r["kernel"] for r in rows), f"{name}: no {ty} kernel in {[r['kernel'] for r in rows]}"
    out = tmp_path / f"{name}.sm{arch}.o"
    if shutil.which("nm"):  # the host launchers exist
        syms = subprocess.run(["nm", "-C", str(out)], capture_output=True, text=True).stdout
        for launcher in LAUNCHERS[name]:
            assert f" T caer_fast::cuda::{launcher}(" in syms, f"{name}: launcher {launcher} not defined"


def test_ptxas_log_parser():
    """The parser the spill check relies on, on a real ptxas -v excerpt with a spill in it."""
    log = ("ptxas info    : Compiling entry function '_ZN9caer_fast4cuda12_GLOBAL__N_114forward_kernelIfEEvPKT_l' "
           "for 'sm_90'\nptxas info    : Function properties for _ZN9caer_fast4cuda12_GLOBAL__N_114forward_kernelIfEEvPKT_l\n"
           "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 456 bytes cmem[0]\n")
    (row,) = nvcc_ptxas.parse(log)
    assert (row["arch"], row["registers"], row["smem"], row["stack"], row["spill_stores"], row["spill_loads"]) == \
        ("sm_90", 40, 128, 16, 8, 4)
    if shutil.which("c++filt"):
        assert row["kernel"] == "forward_kernel<float>", row


@needs_nvcc
def test_common_header_compiles(tmp_path):
    src = tmp_path / "use_common.cu"
    src.write_text('#include "cuda/common.cuh"\n__global__ void k(float* x) { x[0] = caer_fast::cuda::to_float('
                   "caer_fast::cuda::from_float<__nv_bfloat16>(x[0])); }\n")
    _nvcc(["-c", str(src), "-o", str(tmp_path / "c.o")], tmp_path)


@pytest.mark.slow
@needs_nvcc
@pytest.mark.skipif(os.environ.get("CAER_FAST_TEST_NVCC_BINDINGS") != "1",
                    reason="bindings.cu includes torch: minutes on this machine; set CAER_FAST_TEST_NVCC_BINDINGS=1")
def test_bindings_compile(tmp_path):
    from torch.utils.cpp_extension import include_paths

    # the CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated in CUDA builds)
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path / 'shim'}", f"-I{sysconfig.get_paths()['include']}"]
    _nvcc([*incs, "-DTORCH_EXTENSION_NAME=_C", "-diag-suppress", "3306", "-c", str(CUDA_DIR / "bindings.cu"),
           "-o", str(tmp_path / "b.o")], tmp_path, timeout=900)


def test_cuda_backend_reports_why_unavailable():
    import caer_fast.ops as ops

    why = ops.why_unavailable("cuda", "cuda")
    if torch.cuda.is_available() and why is None:
        pytest.skip("the CUDA extension is available here")
    assert why


# ---- gpu tier: the built extension vs the reference ------------------------------------------
class _CudaOps:
    """The public ops, run on the cuda backend (the extension's CUDA kernels)."""

    def __getattr__(self, name):
        import caer_fast.ops as ops

        def run(*args, **kwargs):
            with ops.use_backend("cuda"):
                return getattr(ops, name)(*args, **kwargs)
        return run


def _cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False")
    import caer_fast.ops as ops

    why = ops.why_unavailable("cuda", "cuda")
    if why:
        pytest.skip(f"CUDA extension unavailable: {why}")
    return _CudaOps()


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape, kw", [((4, 256, 7, 7), {}), ((2, 256, 16, 7, 7), {"return_attention": True}),
                                       ((3, 64, 14, 14), {"channels_last": True}),
                                       ((2, 32, 9, 9), {"logit_scale": 1e4})])
def test_gpu_cuda_attention_pool(shape, kw, dtype):
    check_attention_pool(_cuda_backend().attention_pool, shape, dtype, "cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_cuda_adaptive_fusion(dtype):
    backend = _cuda_backend()
    check_adaptive_fusion(backend.adaptive_fusion, 32, 256, 256, dtype, "cuda", return_weights=True)
    check_adaptive_fusion(backend.adaptive_fusion, 5, 100, 300, dtype, "cuda", strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("antialias", [True, False])
def test_gpu_cuda_face_context(antialias, dtype):
    backend = _cuda_backend()
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 400, 712, 3), dtype=torch.uint8, generator=gen)
    boxes = torch.tensor([[300, 80, 420, 220], [0, 0, 0, 0], [690, 390, 800, 500]])
    check_face_context(backend.face_context, frames, boxes, (96, 96), (128, 171), (8, 29, 112, 112), antialias,
                       dtype, "cuda")
