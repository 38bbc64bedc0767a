"""Face-box files on disk (formats in API.md "Face boxes on disk").

- CAER-S (images): the community CSV, no header, ``path,label,x1,y1,x2,y2`` (path relative to the
  split root, integer pixels, xyxy), one line per image with a face. Default names ``train.txt``,
  ``test.txt`` in the data root.
- CAER (video): ``<split>.faces.csv`` in the data root, header ``path,frame,x1,y1,x2,y2,score``,
  path relative to the data root, frame = 0-based index in decode order, one line per frame with a face.

Malformed lines never abort a read: they are returned as :class:`BadLine` records (file, line
number, reason) so callers can count and report them, or raise in ``--strict`` mode.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

Box = Tuple[int, int, int, int]
VIDEO_HEADER = ("path", "frame", "x1", "y1", "x2", "y2", "score")


@dataclass(frozen=True)
class BadLine:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def video_boxes_path(root, split: str) -> Path:
    return Path(root) / f"{split}.faces.csv"


def image_boxes_path(root, split: str) -> Path:
    return Path(root) / f"{split}.txt"


# Coordinates beyond this are not pixels of any frame we decode (and would overflow int64 tensors later).
MAX_COORD = 1 << 20


def _number(text: str, what: str) -> float:
    v = float(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{what} is {text.strip()}, not a finite number")
    return v


def _parse_box(fields: List[str]) -> Box:
    values = [_number(v, "box coordinate") for v in fields]
    if any(abs(v) > MAX_COORD for v in values):
        raise ValueError(f"box coordinate out of range ({', '.join(f.strip() for f in fields)}; at most "
                         f"{MAX_COORD} pixels)")
    x1, y1, x2, y2 = (int(v) for v in values)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty box ({x1}, {y1}, {x2}, {y2})")
    return x1, y1, x2, y2


def _rows(text: str, source: str, bad: List[BadLine]):
    """(line number, fields) per line; a line csv cannot split is a bad line, not an exception."""
    # only real line ends: str.splitlines would also split inside a path at \x0c, \x1e, …
    for lineno, line in enumerate(re.split(r"\r\n|\n|\r", text), start=1):
        try:
            row = next(csv.reader([line]), [])
        except csv.Error as exc:
            bad.append(BadLine(source, lineno, f"unreadable CSV: {exc}"))
            continue
        if row and "".join(row).strip():
            yield lineno, row


def parse_image_boxes(text: str, source: str = "<string>") -> Tuple[Dict[str, Tuple[int, Box]], List[BadLine]]:
    """Parse community CAER-S box lines → ({relpath: (label, box)}, bad lines)."""
    boxes: Dict[str, Tuple[int, Box]] = {}
    bad: List[BadLine] = []
    for lineno, row in _rows(text, source, bad):
        try:
            if len(row) != 6:
                raise ValueError(f"expected 6 fields path,label,x1,y1,x2,y2, got {len(row)}")
            path = row[0].strip()
            if not path:
                raise ValueError("empty path")
            boxes[path] = (int(row[1]), _parse_box(row[2:6]))
        except ValueError as exc:
            bad.append(BadLine(source, lineno, str(exc)))
    return boxes, bad


def parse_video_boxes(text: str, source: str = "<string>"
                      ) -> Tuple[Dict[str, Dict[int, Tuple[Box, float]]], List[BadLine]]:
    """Parse a ``<split>.faces.csv`` → ({relpath: {frame: (box, score)}}, bad lines)."""
    out: Dict[str, Dict[int, Tuple[Box, float]]] = {}
    bad: List[BadLine] = []
    for lineno, row in _rows(text, source, bad):
        if lineno == 1 and tuple(c.strip() for c in row) == VIDEO_HEADER:
            continue
        try:
            if len(row) != 7:
                raise ValueError(f"expected 7 fields {','.join(VIDEO_HEADER)}, got {len(row)}")
            path = row[0].strip()
            if not path:
                raise ValueError("empty path")
            frame = int(row[1])
            if frame < 0:
                raise ValueError(f"negative frame index {frame}")
            if frame >= 2**31:
                raise ValueError(f"frame index {frame} out of range")
            score = _number(row[6], "score")
            out.setdefault(path, {})[frame] = (_parse_box(row[2:6]), score)
        except ValueError as exc:
            bad.append(BadLine(source, lineno, str(exc)))
    return out, bad


def _read_text(path) -> str:
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def read_image_boxes(path):
    return parse_image_boxes(_read_text(path), str(path))


def read_video_boxes(path):
    return parse_video_boxes(_read_text(path), str(path))


def read_box_entries(box_file) -> Tuple[Dict[str, Dict[int, Box]], List[BadLine]]:
    """{path as written in the file: {frame index: box}} of a CAER ``.faces.csv`` (told by its header) or a
    CAER-S box file (frame 0), and its malformed lines. LookupError when the file does not exist."""
    box_file = Path(box_file)
    if not box_file.is_file():
        raise LookupError(f"{box_file}: no such box file")
    text = box_file.read_text(encoding="utf-8", errors="replace")
    if text.startswith(",".join(VIDEO_HEADER)):
        per_file, bad = parse_video_boxes(text, str(box_file))
        return {k: {f: box for f, (box, _) in frames.items()} for k, frames in per_file.items()}, bad
    per_image, bad = parse_image_boxes(text, str(box_file))
    return {k: {0: box} for k, (_, box) in per_image.items()}, bad


def _atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def format_image_boxes(rows: Iterable[Tuple[str, int, Box]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for path, label, (x1, y1, x2, y2) in rows:
        w.writerow([path, int(label), int(x1), int(y1), int(x2), int(y2)])
    return buf.getvalue()


def format_video_boxes(rows: Iterable[Tuple[str, int, Box, float]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(VIDEO_HEADER)
    for path, frame, (x1, y1, x2, y2), score in rows:
        w.writerow([path, int(frame), int(x1), int(y1), int(x2), int(y2), f"{float(score):.4f}"])
    return buf.getvalue()


def write_image_boxes(path, rows: Iterable[Tuple[str, int, Box]]) -> None:
    """Write community-format CAER-S box lines atomically."""
    _atomic_write_text(path, format_image_boxes(rows))


def write_video_boxes(path, rows: Iterable[Tuple[str, int, Box, float]]) -> None:
    """Write a ``<split>.faces.csv`` atomically (header first)."""
    _atomic_write_text(path, format_video_boxes(rows))
