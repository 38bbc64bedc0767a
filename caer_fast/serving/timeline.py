"""The per-clip timeline of a result: rows (:func:`timeline_rows`), the CSV / JSON file
(:func:`write_timeline`) and the picture (:func:`save_timeline_plot`) that ``predict --timeline`` /
``--timeline-plot`` and the server's ``?timeline=1`` give."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, like a plain write would: through a symlink (its target is
    replaced, the link kept), with the old file's mode, or a new file's (0666 less the umask)."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def person_clips(r: dict) -> list:
    """(person id, clip dict) of every person's clips (the main answer's clips as person 0 without a
    ``people`` list)."""
    people = r.get("people") or [{"id": 0, "clips": r["clips"]}]
    return [(p["id"], c) for p in people for c in p["clips"]]


def timeline_rows(r: dict) -> list:
    """One flat row per clip and person (the CSV's columns)."""
    rows = []
    for person, c in person_clips(r):
        row = {"person": person, "clip": c["clip"], "start_s": c["start_s"], "end_s": c["end_s"],
               "first_frame": c["first_frame"],
               "last_frame": c["last_frame"], "emotion": c["emotion"]}
        row.update({f"p_{k}": v for k, v in c["probabilities"].items()})
        row.update({"lambda_face": c["fusion_weights"]["face"], "lambda_context": c["fusion_weights"]["context"],
                    "face_found": int(c["face_found"])})
        rows.append(row)
    return rows


def write_timeline(r: dict, out: Path, source: str = "") -> Path:
    """The per-clip timeline as CSV (by the suffix .csv) or JSON (anything else), written atomically."""
    out = Path(out)
    if out.suffix.lower() == ".csv":
        rows = timeline_rows(r)
        buf = io.StringIO()
        fields = list(rows[0]) if rows else ["person", "clip", "start_s", "end_s"]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        _atomic_write(out, buf.getvalue())
    else:
        doc = {"source": source, "kind": r["kind"], "fps": r["fps"], "emotion": r["emotion"],
               "probabilities": r["probabilities"], "note": r["note"], "truncated": r.get("truncated", False),
               "clip_seconds": None, "clips": [{"person": pid, **c} for pid, c in person_clips(r)],
               "people": [{k: v for k, v in p.items() if k not in ("clips", "face_boxes")}
                          for p in r.get("people", [])]}
        if r["clips"]:
            doc["clip_seconds"] = round(r["clips"][0]["end_s"] - r["clips"][0]["start_s"], 3)
        _atomic_write(out, json.dumps(doc, indent=1))
    return out


EMOTION_COLORS = {"Anger": "#d32f2f", "Disgust": "#7b1fa2", "Fear": "#455a64", "Happy": "#fbc02d",
                  "Neutral": "#9e9e9e", "Sad": "#1976d2", "Surprise": "#f57c00"}


def save_timeline_plot(r: dict, out: Path, title: str = "") -> Path:
    """Probabilities over time (stacked, so they read as shares even for thousands of clips), the
    dominant emotion as a colour strip, λ face, and the spans where a face was found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    clips = r["clips"]
    classes = list(r["probabilities"])
    t0 = np.array([c["start_s"] for c in clips])
    t1 = np.array([c["end_s"] for c in clips])
    mid = (t0 + t1) / 2
    probs = np.array([[c["probabilities"][k] for k in classes] for c in clips]).reshape(-1, len(classes))
    people = r.get("people") or []
    lanes = people if len(people) > 1 else []  # one lane per person: their dominant emotion over their span
    span = max([float(t1.max()) if len(clips) else 1.0] + [c["end_s"] for p in lanes for c in p["clips"]])
    unit, scale = ("min", 60.0) if span > 600 else ("s", 1.0)
    x = mid / scale
    colors = [EMOTION_COLORS.get(k, f"C{i}") for i, k in enumerate(classes)]
    fig = plt.figure(figsize=(14, 6.2 + 0.35 * len(lanes)), dpi=110, constrained_layout=True)
    grid = fig.add_gridspec(4 + len(lanes), 1, height_ratios=[4, 0.45, 1.2, 0.45] + [0.45] * len(lanes))
    ax = fig.add_subplot(grid[0])
    if len(clips) > 1:
        ax.stackplot(x, probs.T, colors=colors, labels=classes, alpha=0.9, linewidth=0)
    else:
        bottom = 0.0
        for j, k in enumerate(classes):
            ax.bar(x, probs[:, j], bottom=bottom, color=colors[j], label=k, width=max(span / scale, 1e-3))
            bottom = bottom + probs[:, j]
    ax.set_ylim(0, 1)
    ax.set_xlim(0, span / scale)
    ax.set_ylabel("probability (stacked)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, title="emotion")
    ax.set_title(title or f"emotion timeline: overall {r['emotion']} ({r['confidence']:.0%})"
                 + (" — the person seen longest; one lane per person below" if lanes else ""), fontsize=11)
    ax.tick_params(labelbottom=False)

    def strip(a, values, label):
        for lo, hi, col in values:
            a.axvspan(lo / scale, hi / scale, color=col, lw=0)
        a.set_xlim(0, span / scale)
        a.set_yticks([])
        a.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)

    def runs(keys, starts=t0, ends=t1):  # merge consecutive clips with the same key: thousands → a few hundred
        out = []
        for lo, hi, k in zip(starts, ends, keys):
            if out and out[-1][2] == k and lo <= out[-1][1] + 1e-9:
                out[-1][1] = max(out[-1][1], hi)
            else:
                out.append([lo, hi, k])
        return out

    ax_e = fig.add_subplot(grid[1], sharex=ax)
    strip(ax_e, [(lo, hi, EMOTION_COLORS.get(k, "k")) for lo, hi, k in runs([c["emotion"] for c in clips])],
          "dominant")
    ax_e.tick_params(labelbottom=False)
    ax_l = fig.add_subplot(grid[2], sharex=ax)
    lam = np.array([c["fusion_weights"]["face"] for c in clips])
    ax_l.plot(x, lam, color="#00897b", lw=1)
    ax_l.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax_l.set_ylim(0, 1)
    ax_l.set_ylabel("λ face", fontsize=9)
    ax_l.tick_params(labelbottom=False)
    ax_f = fig.add_subplot(grid[3], sharex=ax)
    strip(ax_f, [(lo, hi, "#43a047" if k else "#e0e0e0") for lo, hi, k in runs([c["face_found"] for c in clips])],
          "face")
    last = ax_f
    for j, p in enumerate(lanes):
        pc = p["clips"]
        last.tick_params(labelbottom=False)
        last = fig.add_subplot(grid[4 + j], sharex=ax)
        strip(last, [(lo, hi, EMOTION_COLORS.get(k, "k") if k else "#e0e0e0") for lo, hi, k in  # grey: no face
                     runs([c["emotion"] if c["face_found"] else "" for c in pc], [c["start_s"] for c in pc],
                          [c["end_s"] for c in pc])],
              f"person {p['id']}")
    last.set_xlabel(f"time ({unit})")
    ax_f.legend(handles=[Patch(color="#43a047", label="face found"), Patch(color="#e0e0e0", label="no face")],
                loc="upper left", bbox_to_anchor=(1.0, 1.6), fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
