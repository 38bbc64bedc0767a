"""Checks on a CAER / CAER-S folder tree that need no decoding (and no torch): used by training and faces."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..constants import CLASSES

__all__ = ["check_class_folders"]


def check_class_folders(split_dir) -> Optional[str]:
    """What is wrong with the emotion folders of one split, in one line, or None when all 7 are there.

    Names the missing classes, the misnamed folders (a class name in other case, such as ``sad``) and the
    extra ones (``Contempt``); hidden folders are not counted.

    >>> import tempfile, os; d = tempfile.mkdtemp()
    >>> for n in ("Anger", "Disgust", "Fear", "Happy", "Neutral", "sad", "Contempt"): os.mkdir(os.path.join(d, n))
    >>> check_class_folders(d).split(": ", 1)[1]
    'missing class folder Surprise; misnamed sad (the class is Sad); extra folder Contempt (not a class, not used)'
    """
    split_dir = Path(split_dir)
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_fold = {c.casefold(): c for c in CLASSES}
    missing = [c for c in CLASSES if c not in present]
    misnamed = [(n, by_fold[n.casefold()]) for n in present if n not in CLASSES and n.casefold() in by_fold]
    extra = [n for n in present if n not in CLASSES and n.casefold() not in by_fold]
    missing = [c for c in missing if c not in {m[1] for m in misnamed}]
    parts = []
    if missing:
        parts.append(f"missing class folder{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if misnamed:
        parts.append("misnamed " + ", ".join(f"{n} (the class is {c})" for n, c in misnamed))
    if extra:
        parts.append(f"extra folder{'s' if len(extra) > 1 else ''} {', '.join(extra)} (not a class, not used)")
    if not parts:
        return None
    return f"{split_dir}: " + "; ".join(parts)
