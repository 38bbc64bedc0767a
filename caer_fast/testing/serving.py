"""Shared by the serving, predict, export and benchmark tests: real checkpoints, images, videos, servers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from caer_fast.constants import CLASSES
from caer_fast.models import CAERNet, CAERSNet
from caer_fast.testing.media import write_clip

TINY_VIDEO_ARGS = {"face_size": [48, 48], "context_size": [64, 86], "crop": 56, "clip_frames": 8}


def trained_model(model_type: str = "caers", steps: int = 2, seed: int = 0):
    """(model in eval mode, its optimizer, train args, model args): a few SGD steps from random init on random
    data, so the BN running statistics are not the defaults and the logits are not tied across classes (a
    random model's top two classes can sit within int8 rounding of each other on every input)."""
    torch.manual_seed(seed)
    if model_type == "caers":
        model, args, margs = CAERSNet(), {"face_size": [96, 96], "context_size": [128, 171], "crop": 112,
                                          "clip_frames": 16}, {"use_face": True, "use_context": True}
        shapes = ((4, 3, 96, 96), (4, 3, 112, 112))
    else:
        model, args, margs = CAERNet(frames=8), dict(TINY_VIDEO_ARGS), {"use_face": True, "use_context": True,
                                                                        "frames": 8}
        shapes = ((2, 3, 8, 48, 48), (2, 3, 8, 56, 56))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(shapes[0]), torch.randn(shapes[1])),
                                                 torch.randint(0, 7, (shapes[0][0],)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), opt, args, margs


def make_checkpoint(path, model_type: str = "caers", steps: int = 2, seed: int = 0) -> Path:
    """:func:`trained_model`, saved the way train.py saves it."""
    model, opt, args, margs = trained_model(model_type, steps, seed)
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0, "model_type": model_type,
            "model_args": margs, "args": {**args, "model": model_type, "data": "random"}, "classes": list(CLASSES)}
    torch.save(ckpt, path)
    return Path(path)


def full_size_checkpoint(path) -> Path:
    """A full-size CAER-Net (16-frame clips, 96² faces, 112² context crops) from random init, saved as train
    saves it (the streaming and people benches, tools/int8_memory.py)."""
    torch.manual_seed(0)
    model = CAERNet()
    torch.save({"model": model.state_dict(), "epoch": 0, "model_type": "caer",
                "model_args": {"use_face": True, "use_context": True, "frames": 16},
                "args": {"face_size": [96, 96], "context_size": [128, 171], "crop": 112, "clip_frames": 16,
                         "model": "caer"}, "classes": list(CLASSES)}, path)
    return Path(path)


def write_png(path, seed: int = 0, size=(120, 160)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // w), (yy * 255 // h), np.full_like(xx, 40 * (seed % 6))], -1).astype(np.int64)
    img = np.clip(img + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, format="PNG")
    return Path(path)


def write_video(path, frames: int = 24, fps: int = 20, size=(96, 128), codec: str = "mpeg4", seed: int = 0) -> Path:
    """A real video file written with PyAV: a moving square over a gradient."""
    h, w = size
    rng = np.random.default_rng(seed)
    clip = []
    for t in range(frames):
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
        img[..., 1] = (60 + 3 * t) % 256
        x = (5 * t) % (w - 20)
        img[20:40, x:x + 20] = (250, 250, 40)
        clip.append(np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8))
    return write_clip(path, clip, codec, fps, pix_fmt="yuv420p")


def proc_status_bytes(key: str, pid="self") -> int:
    """A memory line of /proc/PID/status in bytes (VmHWM: the peak resident set, VmRSS: the resident set now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m caer_fast.serve`` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint, *extra, cwd=None, startup_timeout: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        repo = str(Path(__file__).resolve().parents[2])  # this checkout's caer_fast in the server too
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        self.log = open(Path(cwd or ".") / f"serve-{self.port}.log", "w+") if cwd else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "caer_fast.serve", "--checkpoint", str(checkpoint),
                                      "--port", str(self.port), *map(str, extra)], cwd=cwd, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"server did not answer /health in {startup_timeout}s: {self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        if self.log is subprocess.DEVNULL:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
