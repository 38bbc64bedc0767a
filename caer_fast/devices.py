"""The machine: one place that turns a ``--device`` value into a ``torch.device`` the commands can use
(shared by ``train``, ``predict`` and ``serve`` so they accept and refuse the same values with the same
words), and what this CPU can do (:func:`cpu_flags`, :func:`has_native_bf16`, :func:`has_vnni`).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch


class DeviceError(ValueError):
    """A ``--device`` value that is not a device name, or names a device this machine does not have."""


def resolve_device(name: Optional[str] = None) -> torch.device:
    """``None`` → CUDA if available, else CPU; "cpu", "cuda", "cuda:N" (and "mps" where present) → that device.

    Raises :class:`DeviceError` with one line saying what is wrong: an unknown name, CUDA asked for on a
    machine (or a torch build) without it, a GPU index past the last GPU.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if name is None or str(name).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"--device {text!r}: not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"--device {text}: {why} (torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"--device {text}: Apple MPS is not available here; use --device cpu")
        return dev
    raise DeviceError(f"--device {text}: {dev.type} devices are not supported (use cpu, cuda or cuda:N)")


# -- what this CPU can do --------------------------------------------------------------------------------

def cpu_flags() -> List[str]:
    """The vector-ISA flags torch sees on this CPU (``torch.cpu.get_capabilities()``), sorted."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # older torch: fall back to the kernel's list
        caps = {}
    flags = sorted(k for k, v in caps.items() if v is True)
    if not flags:
        try:
            text = Path("/proc/cpuinfo").read_text()
            line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
            flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx", "sse4")))
        except Exception:  # no /proc (not Linux): no flags known
            flags = []
    return flags


def has_native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX-512 BF16 or AMX-BF16)? AVX2-only CPUs emulate it."""
    return bool(set(cpu_flags()) & {"avx512_bf16", "amx_bf16"})


def has_vnni() -> bool:
    """Does this CPU have int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX)?"""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # older torch, unknown CPU: assume not (reduce_range is the safe choice)
        return False
    return any(caps.get(k, False) for k in ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8"))


_OPENMP: list = []  # [the OpenMP runtime torch loaded (ctypes), or None]


def _openmp_runtime():
    """ctypes handle of the OpenMP runtime torch's CPU ops use (libgomp, or Intel's / LLVM's), or None."""
    if not _OPENMP:
        import ctypes

        lib = None
        try:
            if "OpenMP" not in torch.__config__.parallel_info():
                raise OSError("torch runs its CPU ops on another thread pool")
            with open("/proc/self/maps") as f:
                paths = {ln.split()[-1] for ln in f if ln.rstrip().endswith((".so", ".so.1", ".so.5"))}
            for name in ("libgomp", "libiomp5", "libomp"):
                hits = sorted(p for p in paths if Path(p).name.startswith(name))
                if hits:
                    lib = ctypes.CDLL(hits[0])  # already loaded: dlopen hands back the same library
                    lib.omp_get_max_threads()
                    break
        except (OSError, AttributeError):
            lib = None
        _OPENMP.append(lib)
    return _OPENMP[0]


class thread_openmp_threads:
    """Within the block, torch's CPU ops called from *this* thread use ``n`` OpenMP threads; other threads keep
    theirs. ``torch.set_num_threads`` would not do: it also sets the default of every thread that starts later
    (e.g. the model's). For a small-convolution model (MTCNN) running beside the main model on a few cores: one
    thread does not wait at OpenMP barriers for cores the main model holds. A no-op where the runtime is not
    found (torch without OpenMP)."""

    def __init__(self, n: int):
        self.n, self.old = max(1, int(n)), None

    def __enter__(self):
        lib = _openmp_runtime()
        if lib is not None:
            torch.get_num_threads()  # torch sets each thread's count once, lazily: let it, before ours
            self.old = lib.omp_get_max_threads()
            lib.omp_set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            _OPENMP[0].omp_set_num_threads(self.old)
            self.old = None
