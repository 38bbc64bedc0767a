"""Face boxes for a CAER (video) or CAER-S (image) tree: ``python -m caer_fast.faces --data ROOT``.

The work is in :mod:`caer_fast.faces.detect`; this package re-exports its names, public helpers included
(``fill_track``, ``detect_video``, ``process_file``, ``run_split``, ``run`` …), so
``from caer_fast.faces import run`` keeps working.
"""
from .detect import (DEFAULT_EVERY, DETECTORS, IMAGE_SPLITS, TRUNCATED, VIDEO_SPLITS, Box, FacesError, FileResult,
                     SplitSummary, check_writable, detect_layout, detect_video, fill_track, init_worker, label_of,
                     log_path, media_files, open_log, process_file, read_log, read_truncated_image, run, run_split,
                     same_face)
# Names the package held before the split (some private): kept importable from here.
from .detect import (CLASSES, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Detection, MediaDecodeError, best_face,
                     format_image_boxes, format_video_boxes, image_boxes_path, make_detector, read_image,
                     video_boxes_path)
from .detect import _atomic_write_text, _open  # noqa: F401

_near = same_face
_label_of = label_of
_init_worker = init_worker
_files = media_files
_open_log = open_log

__all__ = ["DEFAULT_EVERY", "DETECTORS", "IMAGE_SPLITS", "VIDEO_SPLITS", "TRUNCATED", "Box", "FacesError",
           "FileResult", "SplitSummary", "check_writable", "detect_layout", "detect_video", "fill_track",
           "init_worker", "label_of", "log_path", "media_files", "open_log", "process_file", "read_log",
           "read_truncated_image", "run", "run_split", "same_face"]


def __getattr__(name):  # anything else the old module held (its worker state, its imports): live from .detect
    from . import detect

    try:
        return getattr(detect, name)
    except AttributeError:
        raise AttributeError(f"module 'caer_fast.faces' has no attribute {name!r}") from None
