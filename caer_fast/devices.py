"""One place that turns a ``--device`` value into a ``torch.device`` the commands can use.

Shared by ``train``, ``predict`` and ``serve`` so they accept and refuse the same values with the same words.
"""
from __future__ import annotations

from typing import Optional

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
