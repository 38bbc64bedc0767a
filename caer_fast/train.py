"""Train and evaluate CAER-Net (video) or CAER-Net-S (image).

    python -m caer_fast.train --demo                              # built-in demo data, face-only vs face+context
    python -m caer_fast.train --data CAER --model caer -b 32      # the video model on CAER
    python -m caer_fast.train --data CAER-S --model caers --epochs 30 --output-dir runs/caers
    python -m caer_fast.train --data CAER --resume runs/x/checkpoint.pth --output-dir runs/x
    python -m caer_fast.train --data CAER --test-only --resume runs/x/checkpoint.pth
    torchrun --nproc_per_node=2 -m caer_fast.train --data CAER ...   # multi-process (DDP)

Each epoch writes ``checkpoint.pth`` atomically (model, optimizer, lr_scheduler, epoch, args, best score,
…); ``--resume`` continues from it exactly: data order and augmentation are seeded per epoch.
A folder that already holds a run (``checkpoint.pth``, ``model_best.pth`` or ``metrics.json``) is refused
unless ``--resume`` continues that run or ``--overwrite`` replaces it. The output folder is checked
(a folder, writable) before the first step, and locked (one training per folder). ``--overwrite`` removes
nothing up front: the old run stays whole until the new one has written its first checkpoint, so a new run
that fails or is killed before that leaves the old one as it was.
Evaluation reports clip and video top-1 (video = mean of its clips' probabilities), per-class
accuracy, ``metrics.json`` and confusion-matrix PNGs in ``--output-dir``.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .constants import CLASSES, CLIP_FRAMES, CONTEXT_CROP, CONTEXT_SIZE, FACE_SIZE
from .data import calibration as cal
from .data.dali_loader import dali_available, make_dali_loader
from .data.datasets import CAERSImageDataset, CAERVideoDataset, DatasetError, collate
from .data.synthetic import make_demo_dataset
from .data.video import IMAGE_EXTENSIONS, MediaDecodeError, VIDEO_EXTENSIONS
from .devices import DeviceError, resolve_device
from .models import CAERNet, CAERSNet
from .models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .models.optimize import choose_train_precision, optimize
from .training import distributed as dist_utils
from .training.distributed import is_main_process, rank, world_size
from .training.engine import SkipLog, TrainingDiverged, evaluate, skip_kind, train_one_epoch
from .training.metrics import save_confusion_png, write_json

# The demo trains on small inputs so two trainings finish in minutes on a 2-core CPU.
DEMO_SETTINGS = dict(clip_frames=8, face_size=(48, 48), context_size=(64, 86), crop=56, epochs=6, batch_size=8,
                     lr=0.01)
# Files that make a folder "hold a run": a new run there needs --resume or --overwrite.
RUN_FILES = ("checkpoint.pth", "model_best.pth", "metrics.json")
# Everything a run writes (--overwrite removes the old run's once the new run has written its first checkpoint).
RUN_OUTPUTS = RUN_FILES + ("skipped.json", "confusion_test.png")
LOCK_FILE = ".train.lock"  # flock'ed while a training writes the folder (the kernel drops it when the process dies)
_LOCKS: dict = {}  # resolved folder → open lock fd, held by this process
_CREATED: set = set()  # folders this process created (removed again if a run fails before writing anything)
# Settings that change what a resumed run trains on: a resume with other values warns.
RESUME_CHECKED = ("streams", "clip_frames", "face_size", "context_size", "crop")


class UsageError(Exception):
    """A bad command line or output folder: one ``error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of this command
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _size_pair(text: str):
    try:
        parts = [int(p) for p in str(text).lower().replace("x", ",").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if any(v < 1 for v in parts):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    return parts[0], parts[1]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m caer_fast.train", add_help=add_help,
        description="Train and evaluate CAER-Net (video, --model caer) or CAER-Net-S (image, --model caers).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Example: python -m caer_fast.train --demo    |    "
               "torchrun --nproc_per_node=2 -m caer_fast.train --data CAER --model caer")
    p.add_argument("--data", type=Path, default=None,
                   help="dataset root: a CAER tree ({train,validation,test}/<Emotion>/*.avi + <split>.faces.csv) "
                        "or a CAER-S tree ({train,test}/<Emotion>/*.png + <split>.txt)")
    p.add_argument("--model", choices=("caer", "caers"), default="caer",
                   help="caer: video CAER-Net (3-D); caers: image CAER-Net-S")
    p.add_argument("--streams", choices=("both", "face", "context"), default="both",
                   help="ablation: use both streams, or only the face / only the context")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("-b", "--batch-size", type=int, default=32, help="batch size per process")
    p.add_argument("--lr", type=float, default=5e-3, help="SGD learning rate (paper: 5e-3)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=5e-4)
    p.add_argument("--lr-step-size", type=int, default=4, help="divide the lr by --lr-gamma every N epochs")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("-j", "--workers", type=int, default=2, help="data loading worker processes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (first compile takes a while)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="fp32; bf16 (autocast); auto: bf16 only where the CPU has it natively and a measured step "
                        "(after warm-up, cached per machine and model) is faster and converges like fp32. "
                        "Default: the resumed run's precision, else bf16 with --amp on CPU, else fp32")
    p.add_argument("--loader", choices=("torch", "dali"), default="torch",
                   help="torch: PyAV decoding in DataLoader workers; dali: NVIDIA DALI (needs nvidia-dali)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/latest"))
    p.add_argument("--resume", type=Path, default=None, help="checkpoint.pth to continue from")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (without it, a folder holding a run is refused)")
    p.add_argument("--test-only", action="store_true", help="only evaluate (--resume gives the weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="use deterministic algorithms only")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--clip-frames", type=int, default=CLIP_FRAMES, help="frames per clip (sampled at 10 fps)")
    p.add_argument("--face-size", type=_size_pair, default=FACE_SIZE, help="face crop size, N or HxW")
    p.add_argument("--context-size", type=_size_pair, default=CONTEXT_SIZE,
                   help="size the masked frame is resized to, HxW")
    p.add_argument("--crop", type=int, default=CONTEXT_CROP, help="square context crop (random in training)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="CAER-S has no validation split: this fraction of train (by a seeded split) becomes one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--demo", action="store_true",
                   help="generate the built-in demo data (if --data has none) and train face-only and "
                        "face+context on it, then compare; small inputs so it finishes in minutes on a CPU")
    p.add_argument("--demo-per-class", type=int, default=None, metavar="N",
                   help="--demo: write N training videos and images per class (default: the full demo set; "
                        "1-2 make a quick smoke run)")
    return p


def check_args(args) -> None:
    """Refuse option values that would fail later (or train nonsense) with one line naming the option."""
    def need(ok, msg):
        if not ok:
            raise UsageError(msg)

    def finite(v):
        return isinstance(v, (int, float)) and math.isfinite(v)

    need(args.batch_size >= 1, f"-b/--batch-size must be at least 1, got {args.batch_size}")
    need(args.epochs >= 0, f"--epochs must be 0 or more, got {args.epochs}")
    need(finite(args.lr) and args.lr >= 0, f"--lr must be a finite number ≥ 0, got {args.lr}")
    need(finite(args.momentum) and args.momentum >= 0, f"--momentum must be a finite number ≥ 0, got {args.momentum}")
    need(finite(args.weight_decay) and args.weight_decay >= 0,
         f"--weight-decay must be a finite number ≥ 0, got {args.weight_decay}")
    need(args.lr_step_size >= 1, f"--lr-step-size must be at least 1, got {args.lr_step_size}")
    need(finite(args.lr_gamma) and args.lr_gamma > 0, f"--lr-gamma must be a finite number > 0, got {args.lr_gamma}")
    need(args.workers >= 0, f"-j/--workers must be 0 or more, got {args.workers}")
    need(0 <= args.seed < 2 ** 32, f"--seed must be in [0, 2**32), got {args.seed}")
    need(args.clip_frames <= 512, f"--clip-frames {args.clip_frames} is more than 512 (the paper uses 16)")
    for flag, size in (("--face-size", args.face_size), ("--context-size", args.context_size)):
        need(max(size) <= 2048, f"{flag} {size[0]}x{size[1]}: sides over 2048 pixels are refused (memory)")
    min_frames = 8 if args.model == "caer" else 1  # the video model pools time three times
    need(args.clip_frames >= min_frames, f"--clip-frames must be at least {min_frames} for --model {args.model}, "
                                         f"got {args.clip_frames}")
    need(args.crop >= 1 and args.crop <= min(args.context_size),
         f"--crop {args.crop} must be between 1 and the smaller side of --context-size "
         f"{args.context_size[0]}x{args.context_size[1]}")
    need(0 <= args.val_fraction < 1, f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.demo_per_class is not None:
        need(args.demo_per_class >= 1, f"--demo-per-class must be at least 1, got {args.demo_per_class}")
    need(not (args.demo and args.resume), "--demo trains from scratch; it does not take --resume")


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _lock_output_dir(out_dir: Path) -> None:
    """Take this folder's training lock (``flock`` on ``LOCK_FILE``) until the run ends, or raise
    :class:`UsageError` if another process holds it. A killed run's lock is gone with it."""
    key = str(out_dir.resolve())
    if key in _LOCKS:
        return
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise UsageError(f"--output-dir {out_dir} is in use by another training (process {holder or '?'}): wait "
                         f"for it to end, or choose another --output-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = fd


def _unlock_output_dir(out_dir: Path, failed: bool = False) -> None:
    """Release the lock; after a failure, remove the folder again if this process created it and it
    holds nothing but the lock file."""
    key = str(Path(out_dir).resolve())
    fd = _LOCKS.pop(key, None)
    if fd is None:
        return
    try:
        if failed and key in _CREATED and {p.name for p in Path(key).iterdir()} <= {LOCK_FILE}:
            os.unlink(Path(key) / LOCK_FILE)
            os.rmdir(key)
    finally:
        _CREATED.discard(key)
        os.close(fd)


def release_output_dirs(failed: bool = False) -> None:
    """Release every output-folder lock this process holds (see :func:`_unlock_output_dir`)."""
    for key in list(_LOCKS):
        try:
            _unlock_output_dir(Path(key), failed=failed)
        except OSError:
            pass


def prepare_output_dir(out_dir: Path, args) -> list:
    """Check ``--output-dir`` before any work: a writable folder that holds no other run, not in use.

    Creates the folder and takes its lock (one training per folder). Returns the files of an earlier run
    that ``--overwrite`` replaces: nothing is removed here; :func:`_replace_old_run` removes them once the
    new run has written its first output. Raises :class:`UsageError` for a file at that path, a folder
    that cannot be created or written, one another training holds, and a folder holding a run that
    ``--resume`` does not continue (unless ``--overwrite``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir}: is a file, not a folder")
    try:
        if not out_dir.exists():
            out_dir.mkdir(parents=True)
            _CREATED.add(str(out_dir.resolve()))
    except OSError as exc:
        raise UsageError(f"--output-dir {out_dir}: cannot create the folder ({exc.strerror or exc})") from None
    try:  # a read-only mount or missing permission shows here, not after a whole epoch
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--output-dir {out_dir}: cannot write there ({exc.strerror or exc})") from None
    resuming_here = args.resume is not None and _same_folder(Path(args.resume).parent, out_dir)

    def refuse_a_held_run():
        held = [name for name in RUN_FILES if (out_dir / name).exists()]
        if held and not resuming_here and not args.overwrite:
            what = ", ".join(held)
            if args.resume is not None:
                raise UsageError(f"--output-dir {out_dir} holds another run ({what}); --resume {args.resume} is not "
                                 f"from that folder: choose an empty --output-dir, or pass --overwrite to replace it")
            raise UsageError(f"--output-dir {out_dir} already holds a run ({what}): continue it with --resume "
                             f"{out_dir / 'checkpoint.pth'}, replace it with --overwrite, or choose another "
                             f"--output-dir")
        return held

    refuse_a_held_run()  # before the lock file is created: a refused folder is left as it was
    _lock_output_dir(out_dir)
    try:
        held = refuse_a_held_run()  # again: a run that ended just before we took the lock
    except UsageError:
        _unlock_output_dir(out_dir)
        raise
    if not held or resuming_here:
        return []
    return [name for name in RUN_OUTPUTS if (out_dir / name).is_file()]


def _replace_old_run(out_dir: Path, old: list, written: tuple) -> None:
    """--overwrite: the new run has written ``written`` (atomically, over the old files of those names);
    now remove the rest of the old run's files, and say so."""
    if not old:
        return
    gone = []
    for name in old:
        if name not in written:
            (out_dir / name).unlink(missing_ok=True)
        gone.append(name)
    old.clear()
    _log(f"--overwrite: removed the earlier run's {', '.join(gone)} from {out_dir} (replaced by this run's "
         f"{', '.join(written)})")


def _best_in(path: Path) -> float:
    """The best validation score stored in ``path`` (a model_best.pth), or -1 if none can be read."""

    if not path.is_file():
        return -1.0
    try:
        v = read_checkpoint(path).get("best_acc")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else -1.0
    except (CheckpointError, AttributeError):
        return -1.0


def _log(*a):

    if is_main_process():
        print(*a, flush=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def build_datasets(args):
    """(train, validation, test, validation's name); the datasets' warnings become one ``warning:`` line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _build_datasets(args)
    seen = set()
    for w in caught:
        msg = str(w.message)
        if msg not in seen:
            seen.add(msg)
            _log(f"warning: {msg}")
    return out


def _build_datasets(args):

    try:
        return _make_datasets(args)
    except DatasetError as exc:
        if "no files with extensions" not in str(exc):
            raise
        other, exts = ("caers", IMAGE_EXTENSIONS) if args.model == "caer" else ("caer", VIDEO_EXTENSIONS)
        train = Path(args.data) / "train"
        if train.is_dir() and any(p.suffix.lower() in exts for p in train.glob("*/*")):
            raise DatasetError(f"{exc} — it holds {'images' if other == 'caers' else 'videos'}: "
                               f"use --model {other}") from None
        raise


def _make_datasets(args):

    root = Path(args.data)
    if not root.is_dir():
        raise UsageError(f"--data {root}: no such directory")
    common = dict(face_size=tuple(args.face_size), context_size=tuple(args.context_size), crop=args.crop,
                  strict=args.strict)
    if args.model == "caer":
        def make(split, train):
            return CAERVideoDataset(root, split, train=train, clip_frames=args.clip_frames, **common)
        val_split = "validation" if (root / "validation").is_dir() else "test"
        return make("train", True), make(val_split, False), make("test", False), val_split

    def make(split, train):
        return CAERSImageDataset(root, split, train=train, **common)
    train_set, test_set = make("train", True), make("test", False)
    # CAER-S ships no validation split: carve a seeded one out of train.
    val_set = make("train", False)
    n = len(train_set)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = int(round(n * args.val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    val_name = f"{n_val} images ({args.val_fraction:.0%}) carved from train with seed {args.seed}"
    return (torch.utils.data.Subset(train_set, train_idx), torch.utils.data.Subset(val_set, val_idx), test_set,
            val_name)


def build_model(args):

    streams = dict(use_face=args.streams != "context", use_context=args.streams != "face")
    if args.model == "caer":
        return CAERNet(frames=args.clip_frames, **streams)
    return CAERSNet(**streams)


def model_args(args) -> dict:
    """Constructor arguments, stored in checkpoints so predict/serve can rebuild the model."""
    d = dict(use_face=args.streams != "context", use_context=args.streams != "face")
    if args.model == "caer":
        d["frames"] = args.clip_frames
    return d


def make_loader(dataset, args, train: bool, epoch: int = 0, distributed: bool = False):

    if getattr(args, "loader", "torch") == "dali":  # DALI decoding (GPU: NVDEC; CPU: VP8/VP9/MJPEG)
        return make_dali_loader(dataset, args, train, epoch, distributed)

    sampler = None
    generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)  # worker seeds: same on resume
    if train or distributed:
        # One sampler for 1 or N processes: the permutation depends only on (seed, epoch), and N
        # processes with batch b together see the same global batches as 1 process with batch N·b.
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world_size() if distributed else 1, rank=rank() if distributed else 0,
            shuffle=train, seed=args.seed)
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler,
        # a last training batch of 1 would break batch norm: drop the remainder (a new order each epoch)
        num_workers=args.workers, collate_fn=collate, generator=generator,
        drop_last=train and len(sampler or dataset) > args.batch_size,  # this process's share
        persistent_workers=False, pin_memory=False)


def _metrics_line(name, m):
    return (f"{name}: clip top-1 {m['clip']['top1']:.2f}% ({m['clip']['count']} clips), "
            f"video top-1 {m['video']['top1']:.2f}% ({m['video']['count']} videos)")


def _save_eval(m, out_dir: Path, tag: str, title: str):

    save_confusion_png(torch.tensor(m["video"]["confusion_matrix"]), out_dir / f"confusion_{tag}.png",
                       f"{title} — video top-1 {m['video']['top1']:.1f}%")


def main(args, keep_process_group: bool = False) -> dict:

    if args.loader == "dali":  # --loader dali: make_loader hands CAER clips to caer_fast.data.dali_loader
        if args.model != "caer":
            raise UsageError("--loader dali reads videos (--model caer); CAER-S images use --loader torch")
        if not dali_available():
            raise UsageError("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                             "(or use --loader torch, which decodes every codec with PyAV)")


    check_args(args)
    if not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such directory")
    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        raise UsageError(str(exc)) from None
    out_dir = Path(args.output_dir)
    old_run = []  # --overwrite: the earlier run's files, kept until this run has written its first checkpoint
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes; the other ranks stop with it
        old_run = prepare_output_dir(out_dir, args)
    distributed = dist_utils.init_distributed(device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    _seed_everything(args.seed)

    model = build_model(args).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    scaler = torch.amp.GradScaler("cuda") if (args.amp and device.type == "cuda") else None
    start_epoch, best = 0, -1.0
    history = []
    if args.resume:

        ckpt = read_checkpoint(args.resume)
        load_checkpoint(ckpt, model)
        if not args.test_only:
            for key in ("optimizer", "lr_scheduler"):
                if not isinstance(ckpt.get(key), dict):
                    raise CheckpointError(f"{args.resume}: has no {key} state (not a checkpoint.pth written by "
                                          f"this trainer): evaluate it with --test-only")
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["lr_scheduler"])
                if scaler is not None and isinstance(ckpt.get("scaler"), dict):
                    scaler.load_state_dict(ckpt["scaler"])
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise CheckpointError(f"{args.resume}: its optimizer state does not fit this run "
                                      f"({exc.__class__.__name__}: {str(exc)[:200]})") from None
        start_epoch = int(ckpt.get("epoch", -1)) + 1
        # The best score survives a resume: from the checkpoint, or from this folder's model_best.pth.
        best = max(float(ckpt.get("best_acc", -1.0)), _best_in(out_dir / "model_best.pth"))
        history = list(ckpt.get("history") or []) if isinstance(ckpt.get("history"), list) else []
        _warn_resume_mismatch(ckpt, args)
        _log(f"resumed from {args.resume} at epoch {start_epoch}"
             + (f" (best validation video top-1 so far {best:.1f}%)" if best >= 0 else ""))
        if start_epoch >= args.epochs and not args.test_only:
            _log(f"nothing to train: {args.resume} has finished epoch {start_epoch - 1}, --epochs is "
                 f"{args.epochs}; evaluating only")
    elif args.epochs == 0 and not args.test_only:
        _log("warning: --epochs 0: nothing is trained; the untrained model is evaluated")

    # indexing can take minutes on a real tree: after the cheap checks (options, folder, checkpoint)
    train_set, val_set, test_set, val_name = build_datasets(args)
    _log(f"data: {args.data} | train {len(train_set)} {'clips' if args.model == 'caer' else 'images'}, "
         f"validation: {val_name} ({len(val_set)}), test {len(test_set)} | model {args.model}, streams "
         f"{args.streams} | device {device}{f' × {dist_utils.world_size()} processes' if distributed else ''}")
    _report_index_problems((train_set, val_set, test_set))

    train_model = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:

        t = time.perf_counter()
        train_model = optimize(train_model, mode="train", precision="fp32")  # autocast: the engine's, below
        _log(f"compiled (first step pays the compile time; set up in {time.perf_counter() - t:.1f}s)")
    precision = resolve_precision(args, device, model, ckpt if args.resume else None, train_set)
    _log(f"precision: {precision['precision']} ({precision['reason']})")
    amp = "bf16" if precision["precision"] == "bf16" else args.amp
    progress = not args.no_progress and dist_utils.is_main_process()
    num_classes = len(CLASSES)
    eval_kw = dict(amp=amp, progress=progress)

    saved_epochs = []
    if not args.test_only:
        for epoch in range(start_epoch, args.epochs):
            torch.manual_seed(args.seed * 1000 + epoch)  # augmentation and dropout: same on resume
            skips = SkipLog()
            loader = make_loader(train_set, args, train=True, epoch=epoch, distributed=distributed)
            stats = train_one_epoch(train_model, criterion, optimizer, loader, device, epoch, amp=amp,
                                    scaler=scaler, progress=progress, skip_log=skips,
                                    desc=f"train [{args.streams}]")
            scheduler.step()
            if stats["samples"] == 0:
                _log(f"warning: epoch {epoch} trained on no samples (batch {args.batch_size} per process is larger "
                     f"than the training data, or every sample was skipped)")
            record = {"epoch": epoch, "train": stats, "skipped": skips.items}
            if dist_utils.is_main_process():
                val = evaluate(model, make_loader(val_set, args, train=False), device, num_classes,
                               skip_log=skips, desc="validate", **eval_kw)
                record["val"] = {"clip_top1": val["clip"]["top1"], "video_top1": val["video"]["top1"],
                                 "loss": val["loss"]}
                history.append(record)
                is_best = val["video"]["top1"] > best
                best = max(best, val["video"]["top1"])
                ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "args": vars_for_checkpoint(args),
                        "model_type": args.model, "model_args": model_args(args), "classes": list(CLASSES),
                        "best_acc": best, "history": history, "precision": precision}
                if scaler is not None:
                    ckpt["scaler"] = scaler.state_dict()
                save_checkpoint(ckpt, out_dir / "checkpoint.pth")
                _replace_old_run(out_dir, old_run, ("checkpoint.pth",))
                saved_epochs.append(epoch)
                if is_best:
                    save_checkpoint(ckpt, out_dir / "model_best.pth")
                _log(f"epoch {epoch}: loss {stats['loss']:.4f}, train acc {stats['acc']:.1f}%, "
                     f"{stats['samples_per_s']:.1f} {'clips' if args.model == 'caer' else 'images'}/s, "
                     f"lr {stats['lr']:.2g} | val clip {val['clip']['top1']:.1f}%, video {val['video']['top1']:.1f}%"
                     + (" (new best: model_best.pth)" if is_best else "")
                     + (f" | {skips.summary()}" if len(skips) else ""))
                if args.strict is False and len(skips):
                    write_json({"epoch": epoch, "skipped": skips.items}, out_dir / "skipped.json")
            dist_utils.barrier()

    if saved_epochs and dist_utils.is_main_process():
        save_calibration(args, out_dir)
    result = {}
    if dist_utils.is_main_process():
        skips = SkipLog()
        test = evaluate(model, make_loader(test_set, args, train=False), device, num_classes, skip_log=skips,
                        desc="test", **eval_kw)
        _log(_metrics_line("test", test))
        per_class = ", ".join(f"{c} {v:.0f}%" if v is not None else f"{c} -" for c, v in test["video"]["per_class"].items())
        _log(f"per-class (video): {per_class}")
        if len(skips):
            _log(f"test: {skips.summary()}")
        _save_eval(test, out_dir, "test", f"{args.model} [{args.streams}] test")
        result = {"model": args.model, "streams": args.streams, "test": test, "history": history,
                  "skipped_test": skips.items, "precision": precision}
        write_json(result, out_dir / "metrics.json")
        _replace_old_run(out_dir, old_run, ("confusion_test.png", "metrics.json"))
        wrote = [str(out_dir / "metrics.json"), str(out_dir / "confusion_test.png")]
        if saved_epochs:  # only what this run wrote
            span = f"epoch {saved_epochs[0]}" if len(saved_epochs) == 1 else \
                f"epochs {saved_epochs[0]}-{saved_epochs[-1]}"
            wrote.append(f"{out_dir / 'checkpoint.pth'} ({span})")
        _log(f"wrote {', '.join(wrote)}")
    dist_utils.barrier()
    if not keep_process_group:
        dist_utils.cleanup()
    _unlock_output_dir(out_dir)
    return result


CALIBRATION_SAMPLES = 32


def save_calibration(args, out_dir: Path) -> None:
    """``calibration.pt`` beside the checkpoint: a few dozen training clips (images) preprocessed as at
    test time, so ``predict --engine int8`` can calibrate later without the training data."""

    kw = dict(face_size=tuple(args.face_size), context_size=tuple(args.context_size), crop=args.crop)
    try:
        if args.model == "caer":
            batches = cal.video_calibration_batches(args.data, CALIBRATION_SAMPLES, clip_frames=args.clip_frames, **kw)
        else:
            batches = cal.calibration_batches(args.data, CALIBRATION_SAMPLES, **kw)
        cal.save_calibration_sample(out_dir / cal.CALIBRATION_FILE, batches)
    except (OSError, ValueError, RuntimeError) as exc:  # int8 later needs --calibrate; training is done
        _log(f"warning: no {cal.CALIBRATION_FILE} written ({exc})")


def resolve_precision(args, device, model, ckpt, train_set) -> dict:
    """``{"precision": "fp32"|"bf16", "reason": ...}`` for this run (``--precision``; see its help).

    A resumed run keeps its checkpoint's precision unless ``--precision`` names another (then: a
    warning). ``auto`` on CPU measures on the first training batch (:func:`choose_train_precision`)."""

    was = ckpt.get("precision") if isinstance(ckpt, dict) and isinstance(ckpt.get("precision"), dict) else None
    want = args.precision
    if want is None and was is not None and was.get("precision") in ("fp32", "bf16"):
        return {"precision": was["precision"], "reason": f"kept from {args.resume} ({was.get('reason', '')})"}
    if was is not None and want in ("fp32", "bf16") and want != was.get("precision"):
        _log(f"warning: resuming {args.resume}, trained in {was.get('precision')}, with --precision {want}")
    if want is None:
        if args.amp:
            return {"precision": "bf16" if device.type == "cpu" else "fp16", "reason": f"--amp on {device.type}"}
        return {"precision": "fp32", "reason": "default (--precision auto measures bf16 on this CPU)"}
    if want != "auto":
        return {"precision": want, "reason": "--precision " + want}
    if device.type != "cpu":
        return {"precision": "fp32", "reason": f"--precision auto measures CPUs only; on {device.type} use --amp"}
    batch = next((b for b in make_loader(train_set, args, train=True, epoch=0) if len(b["label"])), None)
    if batch is None:
        return {"precision": "fp32", "reason": "--precision auto: no training batch to measure on"}
    d = choose_train_precision(model, batch["face"].to(device), batch["context"].to(device))
    return {"precision": d["precision"], "reason": f"--precision auto, {d['source']}: {d['reason']}"}


def _report_index_problems(datasets) -> None:
    """Log what indexing skipped or found damaged, by kind, once per file (rank 0)."""

    seen, by_kind = set(), {}
    for ds in datasets:
        base = getattr(ds, "dataset", ds)
        for path, reason in list(getattr(base, "bad_files", ())) + list(getattr(base, "truncated", ())):
            if (path, reason) in seen:
                continue
            seen.add((path, reason))
            by_kind.setdefault(skip_kind(f"{path}: {reason}"), []).append((path, reason))
    if not by_kind:
        return
    _log("warning: indexing found " + ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items())))
    for kind, items in sorted(by_kind.items()):
        for path, reason in items[:20]:
            reason = reason[len(kind) + 2:] if reason.startswith(kind + ": ") else reason
            _log(f"warning: {kind}: {path}: {reason}")
        if len(items) > 20:
            _log(f"warning: … and {len(items) - 20} more {kind}")


def _warn_resume_mismatch(ckpt, args) -> None:
    """Resuming with other --streams (or input sizes) than the checkpoint's trains another thing: say so."""
    old = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    for key in RESUME_CHECKED:
        if key not in old:
            continue
        was, now = old[key], getattr(args, key)
        if isinstance(now, tuple):
            now = list(now)
        if was != now:
            flag = "--" + key.replace("_", "-")
            fmt = (lambda v: "x".join(map(str, v)) if isinstance(v, list) else str(v))
            _log(f"warning: resuming {args.resume} with {flag} {fmt(now)}, but it was trained with {flag} "
                 f"{fmt(was)}; continuing with {fmt(now)}")


def vars_for_checkpoint(args) -> dict:
    """argparse values as plain types (checkpoints are read with weights_only=True)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def run_demo(args) -> None:
    """Generate the demo data if needed, train face-only and face+context, compare them.

    Under torchrun the process group is joined once for both trainings; rank 0 writes the demo data
    while the others wait at a barrier, and only rank 0 prints and writes the summary.
    """

    check_args(args)
    out = Path(args.output_dir if args.output_dir != Path("runs/latest") else "runs/demo")
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:  # refuse an earlier demo run before anything is written
        if out.exists() and not out.is_dir():
            raise UsageError(f"--output-dir {out}: is a file, not a folder")
        held = [f"{out / sub / name}" for sub in ("face", "both") for name in RUN_FILES if (out / sub / name).exists()]
        if held and not args.overwrite:
            raise UsageError(f"{out} holds an earlier demo run ({held[0]}…): pass --overwrite to train it again, "
                             f"or choose another --output-dir")
    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        raise UsageError(str(exc)) from None
    distributed = dist_utils.init_distributed(device)
    data_root = Path(args.data) if args.data else out / "demo-data"
    sub = "CAER" if args.model == "caer" else "CAER-S"
    try:
        if main_rank and not (data_root / sub / "train").is_dir():
            _log(f"writing the demo dataset to {data_root} …")
            t = time.perf_counter()
            make_demo_dataset(data_root, seed=args.seed, videos_per_class=args.demo_per_class,
                              images_per_class=args.demo_per_class)
            _log(f"  done in {time.perf_counter() - t:.1f}s")
        dist_utils.barrier()  # the other ranks read the data only once it is whole
        defaults = get_args_parser().parse_args([])
        for k, v in DEMO_SETTINGS.items():  # demo sizes unless the user set them
            if getattr(args, k) == getattr(defaults, k):
                setattr(args, k, v)
        args.data = data_root / sub
        _log(f"demo: {args.model} on {args.data}, {args.epochs} epochs, batch {args.batch_size}, "
             f"clips of {args.clip_frames} frames, face {args.face_size[0]}x{args.face_size[1]}, "
             f"context {args.context_size[0]}x{args.context_size[1]} cropped to {args.crop}"
             + (f", {dist_utils.world_size()} processes" if distributed else ""))
        results = {}
        t0 = time.perf_counter()
        for streams in ("face", "both"):
            run = argparse.Namespace(**vars(args))
            run.streams, run.output_dir, run.demo = streams, out / streams, False
            run.overwrite = True  # checked above for both runs at once
            _log(f"\n=== training with {'face only' if streams == 'face' else 'face + context'} ===")
            results[streams] = main(run, keep_process_group=True)
    finally:
        dist_utils.cleanup()
    if not main_rank:
        return
    face, both = results["face"]["test"], results["both"]["test"]
    unit = "video" if args.model == "caer" else "image"
    gain = both["video"]["top1"] - face["video"]["top1"]
    print(f"\n=== demo result ({time.perf_counter() - t0:.0f}s) — test {unit} top-1 ===")
    print(f"  face only       {face['video']['top1']:6.2f}%   (clips {face['clip']['top1']:.2f}%)")
    print(f"  face + context  {both['video']['top1']:6.2f}%   (clips {both['clip']['top1']:.2f}%)")
    print(f"  context helps by {gain:+.2f} points" + ("" if gain > 0 else "  (unexpected: see the runs)"))
    print(f"  runs, checkpoints and confusion matrices in {out}/face and {out}/both")
    summary = {"face_only": face["video"]["top1"], "face_context": both["video"]["top1"], "gain": gain}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))


def cli(argv=None) -> int:

    args = get_args_parser().parse_args(argv)
    failed = True
    try:
        if args.demo:
            run_demo(args)
        else:
            if args.data is None:
                raise UsageError("--data is required (or use --demo for the built-in demo data)")
            if args.test_only and args.resume is None:
                raise UsageError("--test-only needs --resume CHECKPOINT")
            main(args)
        failed = False
    except (UsageError, DatasetError, CheckpointError, TrainingDiverged, MediaDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while writing metrics.json
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch's checkpoint.pth is intact; continue with --resume",
              file=sys.stderr)
        return 130
    finally:
        release_output_dirs(failed=failed)  # a run that failed before writing leaves no folder it created
    return 0


if __name__ == "__main__":
    sys.exit(cli())
