"""Emotion of a video or an image with a trained CAER-Net / CAER-Net-S checkpoint.

    python -m caer_fast.predict clip.avi --checkpoint runs/demo/both/checkpoint.pth
    python -m caer_fast.predict photo.png --checkpoint model_best.pth --json          # community CAER-S checkpoint
    python -m caer_fast.predict clip.avi --checkpoint ck.pth --save-viz clip.png      # attention + fusion picture
    python -m caer_fast.predict photo.png --checkpoint ck.pth --int8 --calibrate demo-data/CAER-S   # int8 (CPU)
    python -m caer_fast.predict episode.mkv --checkpoint ck.pth --timeline t.csv --timeline-plot t.png
    ffmpeg -i cam.mp4 -f mpegts - | python -m caer_fast.predict - --checkpoint ck.pth --follow   # a pipe
    python -m caer_fast.predict rtsp://camera/stream --checkpoint ck.pth --follow                # any URL PyAV opens

Videos are sampled at 10 fps, faces are detected every few frames (``--detector``), clips of the model's
clip length (8-frame stride) are classified and their probabilities averaged. Without a face the
prediction rests on the context only; the output says so. Videos stream through the pipeline in bounded
memory (whatever their length); a truncated file gives the result up to its last good frame, with a note.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .data import boxes as boxes_io
from .data.detectors import AUTO, DETECTORS
from .data.video import MediaDecodeError, is_url
from .devices import resolve_device
from .serving.engines.cli import USER_ERRORS, add_engine_arguments, check_engine_arguments, engine_from_args, \
    report_error
from .serving.inference import Predictor, is_image_file
from .serving.stream import parse_people
from .serving.timeline import EMOTION_COLORS, save_timeline_plot, write_timeline


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m caer_fast.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", help="a video (.avi, .mp4, …) or an image (.png, .jpg, …); - reads a video stream "
                                "(MPEG-TS, Matroska, …) on standard input; a URL PyAV opens (rtsp://, http://, …)")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="our checkpoint.pth (train.py) or a community CAER-S checkpoint ({'state_dict': …})")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of a summary")
    p.add_argument("--save-viz", type=Path, default=None, metavar="OUT.png",
                   help="save a picture: face box, context attention heat-map, fusion weights, probabilities")
    p.add_argument("--detector", default=AUTO, choices=(AUTO,) + DETECTORS + ("none",),
                   help="face detector. auto: haar with --people main (one face per frame, the answers of earlier "
                        "releases), mtcnn with --people all|N (better recall when everyone counts; one torch thread), "
                        "haar where mtcnn cannot load. none: context only")
    p.add_argument("--detect-every", type=int, default=4, help="detect faces on every k-th sampled frame")
    p.add_argument("--boxes", type=Path, default=None, metavar="FILE",
                   help="take the face boxes from a box file instead of a detector: a CAER <split>.faces.csv "
                        "or a CAER-S <split>.txt (as written by python -m caer_fast.faces or the demo data)")
    p.add_argument("--people", default="main", metavar="main|all|N",
                   help="main: one face per frame, the largest (today's answer); all: every tracked person, each "
                        "with their own clips and answer (the JSON's people list, a person column in the timeline); "
                        "N: at most N people, the largest faces first")
    p.add_argument("--max-people", type=int, default=None, metavar="N",
                   help="cap the people followed: --people all --max-people N is --people N (so is --max-people N "
                        "alone)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--top", type=int, default=3, help="probabilities shown per line in the summary")
    p.add_argument("--timeline", type=Path, default=None, metavar="OUT.csv|OUT.json",
                   help="write the per-clip timeline (start/end s, emotion, probabilities, λ face/context, face found)")
    p.add_argument("--timeline-plot", type=Path, default=None, metavar="OUT.png",
                   help="plot the probabilities over time, the dominant emotion and the spans with a face")
    p.add_argument("--follow", action="store_true",
                   help="print each clip's result as a JSON line as soon as it is ready (then a final result line); "
                        "a file that is still being written is read as it grows")
    p.add_argument("--follow-idle", type=float, default=5.0, metavar="S",
                   help="with --follow on a file: it is complete once it has not grown for this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown on a terminal only)")
    add_engine_arguments(p)
    return p


def _top(probs: dict, k: int) -> str:
    items = sorted(probs.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"{c} {p:.1%}" for c, p in items)


MAX_SUMMARY_CLIPS = 30


def format_summary(r: dict, path, top: int = 3) -> str:
    lines = [f"{path}: {r['kind']}, model {r['model']}" + (f", {r['frames_used']} frames at 10 fps, "
                                                           f"{len(r['clips'])} clips" if r["kind"] == "video" else "")]
    if r["kind"] == "video" and len(r["clips"]) > MAX_SUMMARY_CLIPS:
        lines.append(f"  ({len(r['clips'])} clips: --timeline OUT.csv writes them all)")
    elif r["kind"] == "video" and len(r["clips"]) > 1:
        for c in r["clips"]:
            lines.append(f"  clip {c['clip']:>2} {c['start_s']:6.1f}-{c['end_s']:<6.1f}s  {c['emotion']:<8}  "
                         f"{_top(c['probabilities'], top)}" + ("" if c["face_found"] else "  [no face]"))
    fw = r["fusion_weights"]
    lines.append(f"emotion: {r['emotion']} ({r['confidence']:.1%})  |  {_top(r['probabilities'], top)}")
    lines.append(f"fusion weights: face {fw['face']:.2f}, context {fw['context']:.2f}  |  face found in "
                 f"{r['frames_with_face']}/{r['frames_used']} frames ({r['detector']})"
                 + (f"  |  engine {r['engine']}" if r.get("engine") else ""))
    if len(r.get("people") or []) > 1:  # --people all|N: one line per person (the answer above is the first)
        lines.append(f"{len(r['people'])} people (the answer above is the one seen longest):")
        for p in r["people"]:
            lines.append(f"  person {p['id']:>2} {p['start']:6.1f}-{p['end']:<6.1f}s  {p['emotion']:<8} "
                         f"({p['confidence']:.1%})  {_top(p['probabilities'], top)}  {len(p['clips'])} clips")
    if r["note"]:
        lines.append(f"note: {r['note']}")
    return "\n".join(lines)


def save_visualization(r: dict, out: Path, title: str = "") -> Path:
    """Face box on the frame, attention heat-map over the masked context, λ and probability bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    import torch.nn.functional as F

    v = r["_visual"]
    frame = v["frame"]
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = v["box"]
    has_box = x2 > x1 and y2 > y1
    # The region of the frame the context stream saw: the centre crop of the resized frame, mapped back.
    ch, cw = v["context_size"]
    top, left, kh, kw = v["crop"] or (0, 0, ch, cw)
    sy, sx = h / ch, w / cw
    ry1, ry2, rx1, rx2 = int(round(top * sy)), int(round((top + kh) * sy)), int(round(left * sx)), int(round((left + kw) * sx))
    masked = frame.copy()
    if has_box:
        masked[y1:y2, x1:x2] = 0
    region = masked[ry1:ry2, rx1:rx2]
    att = torch.from_numpy(np.asarray(v["attention"], dtype=np.float32))[None, None]
    att = F.interpolate(att, size=region.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    # In units of the uniform weight (1 = the map's mean), so an untrained or indifferent map reads as flat.
    n_pos = int(np.asarray(v["attention"]).size)
    att = att * n_pos
    vmax = max(2.0, float(att.max()))

    video_strip = r["kind"] == "video" and len(r["clips"]) > 1
    fig = plt.figure(figsize=(12, 6.0 if video_strip else 4.6), dpi=110, constrained_layout=True)
    grid = fig.add_gridspec(2 if video_strip else 1, 3, width_ratios=[1.15, 1.15, 0.9],
                            height_ratios=[3, 1.0] if video_strip else [1])
    ax_f = fig.add_subplot(grid[0, 0])
    ax_c = fig.add_subplot(grid[0, 1])
    right = grid[0, 2].subgridspec(2, 1, height_ratios=[1, 2.6], hspace=0.15)
    ax_l = fig.add_subplot(right[0])
    ax_p = fig.add_subplot(right[1])

    ax_f.imshow(frame)
    if has_box:
        ax_f.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="#00e676", lw=2.2))
        ax_f.text(x1, max(y1 - 4, 0), "face", color="#00e676", fontsize=9, va="bottom", weight="bold")
    else:
        ax_f.text(w / 2, h - 6, "no face found: context only", color="white", ha="center", va="bottom",
                  fontsize=9, bbox=dict(fc="#c62828", ec="none", alpha=0.85, pad=3))
    ax_f.add_patch(plt.Rectangle((rx1, ry1), rx2 - rx1, ry2 - ry1, fill=False, ec="white", lw=1, ls="--"))
    people = r.get("people") or []
    if len(people) > 1:  # everybody on this frame: box, id and emotion (the attention shown is the main person's)
        shown = v.get("frame_index")
        for p in people:
            for f, bx1, by1, bx2, by2, _ in p["face_boxes"]:
                if f == shown:
                    col = EMOTION_COLORS.get(p["emotion"], "#00e676")
                    ax_f.add_patch(plt.Rectangle((bx1, by1), bx2 - bx1, by2 - by1, fill=False, ec=col, lw=1.8,
                                                 ls="-" if p["probabilities"] == r["probabilities"] else "--"))
                    ax_f.text(bx1, by2 + 2, f"{p['id']}: {p['emotion']} {p['confidence']:.0%}", color="white",
                              fontsize=8, va="top", bbox=dict(fc=col, ec="none", alpha=0.8, pad=1.5))
    ax_f.set_title(f"{r['emotion']}  {r['confidence']:.0%}", fontsize=14, weight="bold")
    ax_c.imshow(region)
    im = ax_c.imshow(att, cmap="inferno", alpha=0.5, vmin=0, vmax=vmax)
    ax_c.set_title("context attention (face masked)", fontsize=11)
    cb = fig.colorbar(im, ax=ax_c, fraction=0.046, pad=0.02)
    cb.set_label("× uniform weight", fontsize=8)
    cb.ax.tick_params(labelsize=8)
    if float(att.max() - att.min()) < 1e-3:
        ax_c.text(region.shape[1] / 2, region.shape[0] - 6, "attention is uniform", color="white", ha="center",
                  va="bottom", fontsize=9, bbox=dict(fc="#37474f", ec="none", alpha=0.85, pad=3))
    for ax in (ax_f, ax_c):
        ax.set_xticks([]), ax.set_yticks([])

    fw = r["fusion_weights"]
    ax_l.barh([1, 0], [fw["face"], fw["context"]], color=["#00c853", "#ff6d00"], height=0.6)
    ax_l.set_yticks([1, 0], ["λ face", "λ context"], fontsize=9)
    ax_l.set_xlim(0, 1)
    ax_l.axvline(0.5, color="grey", lw=0.8, ls=":")
    for y, val in ((1, fw["face"]), (0, fw["context"])):
        ax_l.text(min(val + 0.02, 0.86), y, f"{val:.2f}", va="center", fontsize=9)
    ax_l.set_title("fusion weights", fontsize=10)
    ax_l.tick_params(axis="x", labelsize=8)

    items = sorted(r["probabilities"].items(), key=lambda kv: kv[1])
    names, vals = [k for k, _ in items], [p for _, p in items]
    colors = ["#1565c0" if n == r["emotion"] else "#90a4ae" for n in names]
    ax_p.barh(range(len(names)), vals, color=colors)
    ax_p.set_yticks(range(len(names)), names, fontsize=9)
    ax_p.set_xlim(0, 1)
    for i, val in enumerate(vals):
        ax_p.text(min(val + 0.02, 0.86), i, f"{val:.0%}", va="center", fontsize=8)
    ax_p.set_title("class probabilities" + (" (clip mean)" if r["kind"] == "video" else ""), fontsize=10)
    ax_p.tick_params(axis="x", labelsize=8)

    if video_strip:  # per-clip probabilities of the three most likely classes over time
        ax_t = fig.add_subplot(grid[1, :])
        cp, times = np.asarray(v["clip_probs"]), v["clip_times"]
        classes = list(r["probabilities"])
        for j in np.argsort(-cp.mean(0))[:3]:
            ax_t.plot(times, cp[:, j], marker="o", ms=3, label=classes[j])
        ax_t.set_ylim(0, 1)
        ax_t.set_xlabel("time (s, clip centre)", fontsize=9)
        ax_t.set_ylabel("probability", fontsize=9)
        ax_t.legend(fontsize=8, ncol=3, loc="upper right")
        ax_t.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10, color="#444")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def boxes_for(path: Path, box_file: Path) -> dict:
    """{frame index: box} for ``path`` from a CAER ``.faces.csv`` or a CAER-S box file.

    Entries are matched by the path they hold (relative to the data or split root) being a suffix of
    ``path``; a file with no entry raises ``LookupError`` naming both.
    """
    entries, bad = boxes_io.read_box_entries(box_file)
    target = path.resolve().as_posix()
    for key, frames in entries.items():
        if target.endswith("/" + key.lstrip("/")):
            return frames
    skipped = f" ({len(bad)} malformed line{'s' if len(bad) > 1 else ''} skipped, first {bad[0]})" if bad else ""
    raise LookupError(f"{box_file} has no boxes for {path}{skipped}")


class _Progress:
    """tqdm bar over seconds of video on stderr, only on a terminal; total from the header when known."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None
        self.done = 0.0

    def start(self, video) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        total = video.duration_s or (video.header_frames / video.fps if video.header_frames else None)
        self.bar = tqdm(total=round(total, 1) if total else None, unit="s", unit_scale=False, file=sys.stderr,
                        desc="video seconds", dynamic_ncols=True, bar_format=None)

    def clip(self, c) -> None:
        if self.bar is not None and c.end_s > self.done:
            self.bar.update(round(c.end_s - self.done, 3))
            self.done = c.end_s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_output_paths(parser: argparse.ArgumentParser, args) -> None:
    """Refuse --save-viz / --timeline / --timeline-plot names that could not be written, before any work:
    an unknown extension (matplotlib would fail, or silently add .png), a folder, a missing or read-only
    folder to write in."""
    outputs = [("--timeline", args.timeline, (".csv", ".json")), ("--save-viz", args.save_viz, None),
               ("--timeline-plot", args.timeline_plot, None)]
    for flag, path, suffixes in outputs:
        if path is None:
            continue
        if suffixes is None:  # a picture: the formats matplotlib writes
            try:
                from matplotlib.figure import Figure

                suffixes = tuple("." + k for k in Figure().canvas.get_supported_filetypes())
            except ImportError:
                parser.error(f"{flag} needs matplotlib (pip install matplotlib)")
        if path.is_dir():
            parser.error(f"{flag} {path}: is a folder; give a file name ending in {', '.join(suffixes[:4])}")
        if path.suffix.lower() not in suffixes:
            parser.error(f"{flag} {path}: the file name must end in {', '.join(suffixes[:-1])} or {suffixes[-1]}")
        folder = Path(os.path.realpath(path)).parent
        while not folder.exists() and folder != folder.parent:  # --timeline creates missing folders
            if flag != "--timeline":
                parser.error(f"{flag} {path}: the folder {folder} does not exist")
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            parser.error(f"{flag} {path}: cannot write in {folder}")
    named = [str(Path(p).resolve()) for _, p, _ in outputs if p is not None]
    if len(set(named)) < len(named):
        parser.error("--save-viz, --timeline and --timeline-plot must name different files")


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_engine_arguments(parser, args)
    check_output_paths(parser, args)
    try:
        parse_people(args.people)
    except ValueError as exc:
        parser.error(f"--people: {exc}")
    if args.max_people is not None:
        if args.max_people < 1:
            parser.error(f"--max-people must be >= 1, got {args.max_people}")
        if args.people not in ("main", "all"):
            parser.error("give --people N or --max-people N, not both")
        args.people = str(args.max_people)
    if args.people != "main" and args.boxes is not None:
        parser.error("--boxes gives one face per frame: it works with --people main only")
    source = args.path
    local = source != "-" and not is_url(source)
    path = Path(source) if local else None
    progress = _Progress(not args.no_progress and not args.follow)

    def on_clip(c):
        progress.clip(c)
        if args.follow:
            print(json.dumps({"type": "clip", "person": c.person, **c.to_dict()}), flush=True)

    try:
        device = resolve_device(args.device)
        image = local and path.is_file() and is_image_file(path)
        # predict streams: every model call is one chunk (or one image), never a larger batch
        # several people: a step's model call holds every person's chunk, up to the Predictor's batch size
        ckpt, engine = engine_from_args(args, args.checkpoint, device=device,
                                        batch_sizes=None if args.people == "main" else (1, 16),
                                        warmup_batch_sizes=(1,) if image else None, out=sys.stderr)
        predictor = Predictor(ckpt, device=device, detect_every=args.detect_every,
                              detector=None if args.detector == "none" else args.detector, engine=engine)
        if args.boxes is not None and not local:
            raise LookupError(f"--boxes needs a file path, not {source}")
        known = None if args.boxes is None else boxes_for(path, args.boxes)
        with_arrays = args.save_viz is not None
        try:
            result = predictor.predict_file(path if local else source, with_arrays=with_arrays, known_boxes=known,
                                            on_clip=on_clip, follow=args.follow and local, on_start=progress.start,
                                            people=args.people)
        finally:
            progress.close()
        result = result.to_dict()
        if known is not None:
            result["detector"] = f"boxes from {args.boxes.name}"
    except (*USER_ERRORS, MediaDecodeError, LookupError) as exc:
        return report_error(exc, args)
    visual = result.pop("_visual", None)
    name = path.name if local else source
    try:
        if args.save_viz is not None:
            result["_visual"] = visual
            save_visualization(result, args.save_viz, title=f"{name} — {args.checkpoint.name}")
            result.pop("_visual")
        if args.timeline is not None:
            write_timeline(result, args.timeline, source=str(source))
        if args.timeline_plot is not None:
            save_timeline_plot(result, args.timeline_plot, title=f"{name} — {args.checkpoint.name}: overall "
                                                                  f"{result['emotion']} ({result['confidence']:.0%})")
    except OSError as exc:
        print(f"error: could not write {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.follow:
        people = [{k: v for k, v in p.items() if k != "clips"} for p in result["people"]]  # clips: printed already
        print(json.dumps({"type": "result", "path": str(source),
                          **{k: v for k, v in result.items() if k != "clips"}, "people": people}), flush=True)
    elif args.json:
        result["path"] = str(source)
        print(json.dumps(result, indent=2))
    else:
        print(format_summary(result, source, args.top))
        if args.save_viz is not None:
            print(f"picture: {args.save_viz}")
        if args.timeline is not None:
            print(f"timeline: {args.timeline}")
        if args.timeline_plot is not None:
            print(f"timeline plot: {args.timeline_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
