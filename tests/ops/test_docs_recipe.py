"""docs/ops.md's recipe for a new op and a new backend, checked against the tree: the files it lists
exist for every op of ``_dispatch.OPS``, the counts it states add up, and the layers it describes are
kept apart (kernels/ imports nothing of caer_fast; the front doors name no backend)."""
import ast
import re
from pathlib import Path

import pytest

from caer_fast.ops import _dispatch

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "ops.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(f"## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end != -1 else None]


def _paths(text: str) -> list:
    """The file paths in backticks, in order, once each (``<op>`` left in)."""
    found = re.findall(r"`([\w./<>]+\.(?:py|cpp|cu|h|cuh))`", text)
    return list(dict.fromkeys(found))


RECIPE = _section("Adding an op")
ALWAYS = RECIPE[RECIPE.index("Always ("):RECIPE.index("Per backend")]
PER_BACKEND = {m.group(1): m.group(0) for m in re.finditer(r"^- `(\w+)` \(\d+ files?\):.*$", RECIPE, re.M)}


def _first_path(item: str) -> str:
    return _paths(item)[0]


def test_always_list_counts_and_files():
    items = re.findall(r"^\d+\. .*$", ALWAYS, re.M)
    stated = int(re.search(r"Always \((\d+) files\)", ALWAYS).group(1))
    files = [_first_path(item) for item in items]  # each item is one file
    assert len(files) == len(set(files)) == stated, files
    assert re.search(r"Six files \(five source, one test", RECIPE)
    assert sum(f.startswith("tests/") for f in files) == 1 and len(files) - 1 == 5


@pytest.mark.parametrize("op", _dispatch.OPS)
def test_every_listed_file_exists_for_every_op(op):
    listed = _paths(ALWAYS) + [p for text in PER_BACKEND.values() for p in _paths(text)]
    for path in listed:
        assert (ROOT / path.replace("<op>", op)).is_file(), f"docs/ops.md names {path}: missing for {op}"
    # the shared files hold the op, where the recipe says
    assert f'm.def("{op}(' in (ROOT / "csrc/ops.cpp").read_text()
    assert re.search(rf"\b{op}\b", (ROOT / "caer_fast/ops/__init__.py").read_text())
    assert f'm.impl("{op}"' in (ROOT / "csrc/cuda/bindings.cu").read_text()
    assert f'"{op}_kernels.cu"' in (ROOT / "tests/test_cuda_sources.py").read_text()
    assert f'm.impl("{op}"' in (ROOT / f"csrc/cpu/{op}.cpp").read_text()
    # an op with a backward has its formula under the Autograd key, one without has none there
    has_backward = f'm.def("{op}_backward(' in (ROOT / "csrc/ops.cpp").read_text()
    assert (f'm.impl("{op}"' in (ROOT / "csrc/autograd.cpp").read_text()) == has_backward, op


def test_per_backend_counts_and_total():
    assert set(PER_BACKEND) == {name for name, row in _dispatch.TABLE.items() if not row.reference}, PER_BACKEND
    counts = {}
    for name, line in PER_BACKEND.items():
        stated = int(re.search(r"\((\d+) files?\)", line).group(1))
        assert len(_paths(line.split(":", 1)[1])) == stated, (name, _paths(line))
        counts[name] = stated
    always = int(re.search(r"Always \((\d+) files\)", ALWAYS).group(1))
    total, source, tests = map(int, re.search(r"is (\d+) files \((\d+) source, (\d+) test\)", RECIPE).groups())
    listed = _paths(ALWAYS) + [p for text in PER_BACKEND.values() for p in _paths(text.split(":", 1)[1])]
    assert total == always + sum(counts.values()) == len(set(listed))
    assert tests == sum(p.startswith("tests/") for p in set(listed)) and source == total - tests


def test_backend_recipe_names_real_files():
    paths = _paths(_section("Adding a backend"))
    assert paths, "the backend recipe names no file"
    for path in paths + ["setup.py"]:  # the triton backend's package stands for <package>
        for op in _dispatch.OPS:
            assert (ROOT / path.replace("<package>", "kernels").replace("<op>", op)).is_file(), path
    text = _section("Adding a backend")
    for field in re.findall(r"`(\w+)`", text.split("its row in `TABLE`", 1)[1].split(")", 1)[0]):
        assert field in _dispatch.Backend.__dataclass_fields__, field


def test_kernels_stand_apart():
    """kernels/ is plain functions with the ops' signatures, like csrc/: no import of caer_fast."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("caer_fast"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("caer_fast") for a in node.names), path.name
