"""Shared fixtures."""
import os
import tempfile

import pytest

# Keep the dataset index cache (caer_fast.data.index_cache) of test runs out of the user's ~/.cache;
# subprocesses (train, faces) inherit it.
os.environ.setdefault("CAER_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="caer_fast_test_cache_"))
# predict/serve default to --engine auto, which exports and measures once per model, size and batch range
# (tens of seconds on these machines): the CLI tests run eager unless they ask; tests/test_engines.py runs
# the auto choice, the ONNX Runtime engine and the cold/warm cache through real predict/serve processes.
os.environ.setdefault("CAER_FAST_ENGINE", "eager")

# Small on purpose (a few seconds to write): 2 train videos per class, 1 validation, 1 test; images 2 / 1.
DEMO_VIDEOS = {"train": 2, "validation": 1, "test": 1}
DEMO_IMAGES = {"train": 2, "test": 1}
DEMO_SEED = 0


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo tree written once per test session: yields DIR with DIR/CAER and DIR/CAER-S.

    Tests must not modify it (copy what you need to damage into ``tmp_path``).
    """
    from caer_fast.data.synthetic import make_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, seed=DEMO_SEED, videos_per_class=DEMO_VIDEOS, images_per_class=DEMO_IMAGES)
    yield out
