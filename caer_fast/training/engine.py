"""One epoch of training and one pass of evaluation (clip and video accuracy)."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .distributed import all_reduce_sum, is_distributed
from .metrics import confusion_matrix, summarize


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _autocast(device: torch.device, amp):
    """``amp``: False (fp32), True (fp16 on CUDA, bf16 on CPU) or ``"bf16"`` (bf16 on any device)."""
    if not amp:
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" or device.type != "cuda" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(batch, device, channels_last: bool = False):
    face = batch["face"].to(device, non_blocking=True)
    context = batch["context"].to(device, non_blocking=True)
    if channels_last:
        fmt = torch.channels_last_3d if face.dim() == 5 else torch.channels_last
        face, context = face.contiguous(memory_format=fmt), context.contiguous(memory_format=fmt)
    return face, context, batch["label"].to(device, non_blocking=True)


def skip_kind(reason: str) -> str:
    """Which kind of bad input a skip ("path: reason" or a reason) is: "truncated / partly decodable"
    (some frames decode), "bad box line" (``file:line: …``) or "unreadable" (nothing of the file usable)."""
    import re

    if "truncated / partly decodable" in reason or re.search(r": decoding failed after [1-9]", reason):
        return "truncated / partly decodable"
    if re.match(r"[^\n]*?\.(csv|txt):\d+(: |$)", reason):
        return "bad box line"
    return "unreadable"


class SkipLog:
    """Counts and names the inputs skipped in an epoch (corrupt files, bad box lines…), by kind."""

    def __init__(self):
        self.items: List[str] = []

    def add(self, batch) -> None:
        self.items.extend(batch.get("skipped_items", ()) or ())
        extra = int(batch.get("skipped", 0)) - len(batch.get("skipped_items", ()) or ())
        self.items.extend(["<unnamed sample>"] * max(extra, 0))

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for item in self.items:
            k = skip_kind(item)
            out[k] = out.get(k, 0) + 1
        return out

    def summary(self, limit: int = 10) -> str:
        if not self.items:
            return "no inputs skipped"
        uniq = sorted(set(self.items))
        shown = "\n  ".join(f"[{skip_kind(u)}] {u}" for u in uniq[:limit])
        more = f"\n  … and {len(uniq) - limit} more" if len(uniq) > limit else ""
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        return f"{len(self.items)} samples skipped ({kinds}; {len(uniq)} distinct):\n  {shown}{more}"


def train_one_epoch(model, criterion, optimizer, loader, device: torch.device, epoch: int, *, amp: bool = False,
                    scaler: Optional[torch.amp.GradScaler] = None, channels_last: bool = False,
                    progress: bool = True, desc: str = "train", skip_log: Optional[SkipLog] = None) -> Dict:
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"{desc} epoch {epoch}", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        if skip_log is not None:
            skip_log.add(batch)
        skip = batch["label"].numel() < 2  # nothing left after skipped reads, or too few for batch norm
        if is_distributed():  # every process must skip together, or DDP's gradient all-reduce hangs
            skip = bool(all_reduce_sum(torch.tensor([float(skip)])).item())
        if skip:
            continue
        face, context, target = _to_device(batch, device, channels_last)
        with _autocast(device, amp):
            logits = model(face, context)
            loss = criterion(logits.float(), target)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, step {steps}: training stopped "
                                   f"(lower --lr, or check the inputs); the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = target.numel()
        steps += 1
        seen += n
        total_loss += loss.item() * n
        correct += int((logits.argmax(dim=1) == target).sum())
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2g}", clips_s=f"{seen / elapsed:.1f}")
    bar.close()
    elapsed = time.perf_counter() - start
    if is_distributed():  # epoch statistics over all processes, not rank 0's share
        total_loss, correct, seen = all_reduce_sum(
            torch.tensor([total_loss, correct, seen], dtype=torch.float64)).tolist()
        correct, seen = int(correct), int(seen)
    return {"loss": total_loss / max(seen, 1), "acc": 100.0 * correct / max(seen, 1), "samples": seen,
            "samples_per_s": seen / max(elapsed, 1e-9), "seconds": elapsed, "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(model, loader, device: torch.device, num_classes: int, *, amp: bool = False,
             channels_last: bool = False, progress: bool = True, desc: str = "eval",
             skip_log: Optional[SkipLog] = None) -> Dict:
    """Clip-level and video-level (softmax averaged over a video's clips) accuracy."""
    model.eval()
    probs, targets, videos = [], [], []
    total_loss, start = 0.0, time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        if skip_log is not None:
            skip_log.add(batch)
        if batch["label"].numel() == 0:
            continue
        face, context, target = _to_device(batch, device, channels_last)
        with _autocast(device, amp):
            logits = model(face, context).float()
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        probs.append(logits.softmax(dim=1).cpu())
        targets.append(target.cpu())
        videos.append(batch["video"].cpu())
    elapsed = time.perf_counter() - start
    if not probs:
        return {"clip": summarize(torch.zeros(num_classes, num_classes, dtype=torch.long)),
                "video": summarize(torch.zeros(num_classes, num_classes, dtype=torch.long)), "loss": float("nan")}
    probs, targets, videos = torch.cat(probs), torch.cat(targets), torch.cat(videos)
    clip_cm = confusion_matrix(targets, probs.argmax(dim=1), num_classes)
    # video prediction: mean of its clips' probabilities
    uniq, inv = torch.unique(videos, return_inverse=True)
    video_probs = torch.zeros(len(uniq), num_classes).index_add_(0, inv, probs)
    video_targets = torch.zeros(len(uniq), dtype=torch.long).scatter_(0, inv, targets)
    video_cm = confusion_matrix(video_targets, video_probs.argmax(dim=1), num_classes)
    return {"clip": summarize(clip_cm), "video": summarize(video_cm), "loss": total_loss / len(targets),
            "samples_per_s": len(targets) / max(elapsed, 1e-9)}
